"""Packaging: licence and metadata, one version source, what the sdist and the wheel carry.

The sdist and metadata builds run on a copy of the checkout with a compiler that only
records its calls, which proves that neither runs the OpenMP probe nor compiles anything.
The wheel test compiles the kernels, so it is slow.
"""
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import cbn

ROOT = Path(__file__).parent.parent
BUILD_TIMEOUT = 600
# Left behind by builds, tests, the demo and the benchmarks: never part of the sources.
NOT_SOURCES = ("__pycache__", "*.pyc", "*.so", "*.egg-info", ".venv*", "build", "dist", ".git",
               ".pytest_cache", ".hypothesis", "results", "*.png", "_*.c")
# What the tests, examples and benchmarks need, and so what an sdist must hold.
SOURCE_DIRS = ("tests", "examples", "mpi_examples", "benchmarks", "docs")


def test_metadata_names_the_licence_the_authors_and_one_version():
    meta = importlib.metadata.metadata("cbn")
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert "LICENSE" in meta.get_all("License-File")
    assert meta["Author"] == "the cbn developers"
    assert meta["Version"] == cbn.__version__
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("BSD 3-Clause License") and "the cbn developers" in licence
    assert f"## {cbn.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_the_version_is_written_once():
    assert re.search(r'^dynamic = \["version"\]', (ROOT / "pyproject.toml").read_text(), re.M)
    candidates = [ROOT / "pyproject.toml", *sorted((ROOT / "cbn").glob("*.py"))]
    written = [path.name for path in candidates
               if re.search(r"""^(__version__|version)\s*=\s*["']""", path.read_text(), re.M)]
    assert written == ["_version.py"]


def test_py_typed_is_declared_as_package_data():
    assert (ROOT / "cbn" / "py.typed").exists()
    assert re.search(r'^cbn = \[.*"py.typed".*\]', (ROOT / "pyproject.toml").read_text(), re.M)


def _build(tmp_path, *options, source=None):
    """Run ``python -m build OPTIONS`` on a clean copy of the checkout (or on ``source``)
    with a compiler that records its calls; returns (stdout, recorded compiler calls)."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (it is in the test extra)")
    if source is None:
        source = tmp_path / "src"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    calls = tmp_path / "compiler-calls"
    compiler = tmp_path / "cc"
    compiler.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    compiler.chmod(0o755)
    env = dict(os.environ, CC=str(compiler))
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", *options,
                           str(source)], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout, calls.read_text() if calls.exists() else ""


def _sources(root):
    """Every file of the source tree under ``SOURCE_DIRS``, relative to ``root``."""
    found = set()
    for top in SOURCE_DIRS:
        for path in (root / top).rglob("*"):
            parts = path.relative_to(root).parts
            if path.is_file() and not any(Path(part).match(pattern) for part in parts
                                          for pattern in NOT_SOURCES):
                found.add("/".join(parts))
    return found


def test_sdist_holds_what_the_tests_examples_and_benchmarks_need_and_compiles_nothing(
        tmp_path):
    _, calls = _build(tmp_path, "--sdist", "--outdir", str(tmp_path / "dist"))
    assert calls == "", f"building an sdist ran the compiler (the OpenMP probe?): {calls}"
    (archive,) = (tmp_path / "dist").glob("cbn-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"LICENSE", "CHANGELOG.md", "README.md", "Makefile", "pyproject.toml", "setup.py",
              "cbn/py.typed", "cbn/_version.py", "tests/conftest.py", "tests/twin.py",
              "tests/launch.py", "mpi_examples/train.py", "mpi_examples/data.py",
              *(f"pyx/{p.name}" for p in (ROOT / "pyx").iterdir()
                if p.suffix in (".pyx", ".pxd", ".h"))}
    needed |= _sources(tmp_path / "src")
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"
    leftovers = sorted(n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n)
    assert not leftovers, leftovers


def test_wheel_metadata_builds_without_compiling(tmp_path):
    out, calls = _build(tmp_path, "--metadata")
    assert calls == "", f"preparing metadata ran the compiler (the OpenMP probe?): {calls}"
    meta = json.loads(out[out.index("{"):])
    assert meta["version"] == cbn.__version__
    assert meta["license_expression"] == "BSD-3-Clause"


def _elf_section_names(data):
    """Section names of a 64-bit little-endian ELF file."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit LE ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strings_offset = headers[shstrndx][4]
    return [data[strings_offset + h[0]:data.index(b"\0", strings_offset + h[0])].decode()
            for h in headers]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks ELF sections")
def test_wheel_from_the_sdist_ships_py_typed_and_no_debug_info(tmp_path):
    _build(tmp_path, "--sdist", "--outdir", str(tmp_path / "dist"))
    (archive,) = (tmp_path / "dist").glob("cbn-*.tar.gz")
    real = dict(os.environ)
    real.pop("CC", None)
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel",
                           "--outdir", str(tmp_path / "wheel"), str(archive)],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=real)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    (wheel,) = (tmp_path / "wheel").glob("cbn-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {"cbn/py.typed", "cbn/_version.py"} <= names
        assert any(n.endswith("dist-info/licenses/LICENSE") for n in names), sorted(names)
        extensions = [n for n in names if n.endswith(".so")]
        assert len(extensions) >= 4, sorted(names)
        for name in extensions:
            sections = _elf_section_names(zf.read(name))
            debug = [s for s in sections if s.startswith((".debug", ".zdebug"))]
            assert not debug, f"{name} carries debug info: {debug}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("version, flags", [
    ("mpiexec (Open MPI) 5.0.11", ["--oversubscribe"]),
    ("mpiexec (OpenRTE) 4.1.4", ["--oversubscribe"]),
    ("HYDRA build details:\n    Version:   5.0.2", []),
])
def test_make_demo_passes_the_flags_each_mpi_launcher_needs(tmp_path, version, flags):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    launcher = venv / "bin" / "mpiexec"
    launcher.write_text(f"#!/bin/sh\nprintf '%s\\n' '{version}'\n")
    launcher.chmod(0o755)
    if flags and os.geteuid() == 0:
        flags = flags + ["--allow-run-as-root"]
    done = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", f"VENV={venv}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "mpi_examples/train.py" in line]
    words = line.split()
    at = words.index(str(launcher))
    assert words[at + 1:words.index("-n", at)] == flags, line
