"""The CPU kernel builder: sources ship with the package, a broken source warns and falls back to None."""
import pytest

from slimlm.serve.kernels import cpu_build


def test_every_library_source_is_in_the_package():
    for name in ("gemv", "attention", "norm", "rope", "decode_stack", "qgemv"):
        assert (cpu_build.SOURCE_DIR / f"{name}.c").is_file()
    assert (cpu_build.SOURCE_DIR / "prelude.h").is_file()


def test_a_source_that_does_not_compile_warns_and_gives_none(tmp_path, monkeypatch):
    if not cpu_build.CPU_NEEDS <= cpu_build.cpu_flags():
        pytest.skip("this CPU lacks AVX-512 with BF16, so nothing is compiled at all")
    (tmp_path / "broken.c").write_text("this is not C\n")
    monkeypatch.setattr(cpu_build, "SOURCE_DIR", tmp_path)
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    cpu_build.build_cpu_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="did not compile"):
            assert cpu_build.build_cpu_kernels("broken") is None
    finally:
        cpu_build.build_cpu_kernels.cache_clear()


def test_the_source_key_follows_every_file(tmp_path, monkeypatch):
    (tmp_path / "a.c").write_text("int a;\n")
    (tmp_path / "prelude.h").write_text("/* v1 */\n")
    monkeypatch.setattr(cpu_build, "SOURCE_DIR", tmp_path)
    before = cpu_build._source_key("cc")
    (tmp_path / "prelude.h").write_text("/* v2 */\n")
    assert cpu_build._source_key("cc") != before
    assert cpu_build._source_key("clang") != cpu_build._source_key("cc")
