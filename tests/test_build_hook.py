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
        hatch_build.compile_library(compiler, source, tmp_path / "out.so", (), ())


def test_the_kernels_compile_with_the_header_just_written_not_a_stale_one(tmp_path):
    # An editable install leaves a header next to the source; a later wheel build (other
    # table) must compile against its own, from -I.
    compiler = hatch_build.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler here")
    root = pathlib.Path(hatch_build.__file__).parent
    source = tmp_path / "src" / hatch_build.KERNELS.name
    source.parent.mkdir()
    source.write_text((root / hatch_build.KERNELS).read_text())
    (source.parent / hatch_build.HEADER).write_text('#error "the stale header was used"\n')
    out = tmp_path / "out"
    out.mkdir()
    table = hatch_build.read_table(root / hatch_build.TABLE)
    header = hatch_build.write_header(table, out / hatch_build.HEADER)
    include = (out, hatch_build.jaxlib_include())
    library = hatch_build.compile_library(compiler, source, out / "k.so", (), include)
    assert library.stat().st_size > 0 and header.read_text().startswith("// Written by")


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
