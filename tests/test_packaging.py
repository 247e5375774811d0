"""A built wheel installs the top-level folders under the slimlm namespace, with a console script."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_folders_into_the_slimlm_namespace(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("slimlm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("slimlm/toolkit/__init__.py", "slimlm/toolkit/models/load.py", "slimlm/serve/__init__.py",
                     "slimlm/recipes/cli.py", "slimlm/serve/kernels/cpu/prelude.h",
                     "slimlm/serve/kernels/cpu/decode_stack.c"):
        assert required in names
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"slimlm"} | {n.split("/")[0] for n in names if ".dist-info" in n}, tops
    assert not any(n.startswith("slimlm/__init__") for n in names)  # slimlm stays a namespace
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "slimlm = slimlm.recipes.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
