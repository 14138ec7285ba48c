"""The build hook that compiles the CPU kernels (hatch_build.py): clear errors at build time,
never at run time."""

import pathlib

import pytest

import hatch_build


def test_an_unparsable_cxx_is_a_clear_build_error(monkeypatch):
    monkeypatch.setenv("CXX", 'g++ "-O2')
    with pytest.raises(RuntimeError, match=r"CXX=.*cannot be parsed"):
        hatch_build.find_compiler()


def test_a_missing_compiler_means_no_kernels_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hatch_build.find_compiler() is None


def test_a_failing_compiler_says_how_to_build_without_the_kernels(tmp_path):
    source = tmp_path / "broken.cc"
    source.write_text("this is not C++\n")
    compiler = hatch_build.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler here")
    with pytest.raises(RuntimeError, match="STABLELAYERS_CPU_KERNELS=0"):
        hatch_build.compile_library(compiler, source, tmp_path / "out.so", (), None)


def test_every_variant_the_loader_may_ask_for_is_built():
    # The probe's names (src/stablelayers/_cpu_features.cc) are the libraries' names.
    probe = pathlib.Path(hatch_build.__file__).parent / hatch_build.PROBE
    reported = {
        name
        for line in probe.read_text().splitlines()
        if 'return "' in line
        for name in line.split('"')[1].split(",")
    }
    built = {name for variants in hatch_build.VARIANTS.values() for name in variants}
    assert reported == built | set(hatch_build.DEFAULT_VARIANTS)


def test_the_manifest_lists_each_library_checksum(tmp_path):
    library = tmp_path / "_cpu_kernels_x.so"
    library.write_bytes(b"\x7fELF fake")
    manifest = hatch_build.write_manifest([library], tmp_path / hatch_build.MANIFEST)
    digest, name = manifest.read_text().split()
    assert name == library.name and len(digest) == 64
