"""The CPU kernel builder: sources ship with the package, a broken source warns and falls back to None."""
import pytest

from slimlm.serve.kernels import cpu_build


def test_every_library_source_is_in_the_package():
    for name in ("gemv", "attention", "norm", "rope", "decode_stack", "qgemv", "argmax"):
        assert (cpu_build.SOURCE_DIR / f"{name}.c").is_file()
    assert (cpu_build.SOURCE_DIR / "prelude.h").is_file()
    assert (cpu_build.SOURCE_DIR / "avx2_compat.h").is_file()


def test_a_source_that_does_not_compile_warns_and_gives_none(tmp_path, monkeypatch):
    if cpu_build.cpu_isa() is None:
        pytest.skip("this CPU has neither AVX-512 with BF16 nor AVX2 with FMA and F16C, so nothing is compiled at all")
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
    flags = cpu_build.CFLAGS + cpu_build.ISAS["avx2"][1]
    before = cpu_build._source_key("cc", flags)
    (tmp_path / "prelude.h").write_text("/* v2 */\n")
    assert cpu_build._source_key("cc", flags) != before
    assert cpu_build._source_key("clang", flags) != cpu_build._source_key("cc", flags)
    assert cpu_build._source_key("cc", cpu_build.CFLAGS + cpu_build.ISAS["avx512"][1]) != cpu_build._source_key("cc", flags)


def test_the_isa_is_the_best_the_cpu_has_unless_asked(monkeypatch):
    both = cpu_build.ISAS["avx512"][0] | cpu_build.ISAS["avx2"][0]
    monkeypatch.delenv("SLIMLM_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: both)
    assert cpu_build.cpu_isa() == "avx512"
    monkeypatch.setenv("SLIMLM_CPU_ISA", "avx2")
    assert cpu_build.cpu_isa() == "avx2"
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: cpu_build.ISAS["avx2"][0])
    monkeypatch.setenv("SLIMLM_CPU_ISA", "avx512")
    assert cpu_build.cpu_isa() is None          # asked for what the CPU lacks: no kernels, not a crash
    monkeypatch.delenv("SLIMLM_CPU_ISA")
    assert cpu_build.cpu_isa() == "avx2"
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: {"sse2", "avx"})
    assert cpu_build.cpu_isa() is None
    monkeypatch.setenv("SLIMLM_CPU_ISA", "neon")
    with pytest.raises(ValueError, match="SLIMLM_CPU_ISA='neon': expected one of avx512, avx2"):
        cpu_build.cpu_isa()
