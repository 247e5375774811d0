"""Map the top-level folders onto one import namespace: toolkit/ -> slimlm.toolkit, and so on.

PyPI already has packages named `toolkit` and `recipes`, so nothing generic may land in
site-packages; `slimlm` itself is an implicit namespace package. Metadata lives in pyproject.toml.
"""
from setuptools import find_packages, setup

TOPS = ("toolkit", "serve", "recipes")
packages = [f"slimlm.{top}" for top in TOPS]
packages += [f"slimlm.{top}.{sub}" for top in TOPS for sub in find_packages(top)]
# The CPU kernels are C sources compiled on the user's machine at first use (serve/kernels/cpu_build.py).
setup(packages=packages, package_dir={f"slimlm.{top}": top for top in TOPS},
      package_data={"slimlm.serve.kernels": ["cpu/*.c", "cpu/*.h", "tuned/*.json"]})
