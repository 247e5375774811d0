"""Map the top-level folders onto one import namespace: toolkit/ -> slimlm.toolkit, and so on.

PyPI already has packages named `toolkit` and `recipes`, so nothing generic may land in
site-packages; `slimlm` itself is an implicit namespace package. Metadata lives in pyproject.toml.
"""
from setuptools import find_packages, setup

TOPS = ("toolkit", "serve", "recipes")
packages = [f"slimlm.{top}" for top in TOPS]
packages += [f"slimlm.{top}.{sub}" for top in TOPS for sub in find_packages(top)]
setup(packages=packages, package_dir={f"slimlm.{top}": top for top in TOPS})
