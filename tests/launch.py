"""How the tests start MPI jobs: the launcher, the flags each MPI needs, a timeout.

Every test that runs ``mpiexec`` goes through ``mpiexec_command`` and
``run_ranks_script``, so the flags that MPICH and Open MPI each need are
written once (Open MPI refuses more ranks than cores without
``--oversubscribe``, and root without ``--allow-run-as-root``).
"""
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
MPI_TIMEOUT = 240  # seconds per mpiexec run: a hang fails the test instead of the suite


@functools.lru_cache(maxsize=None)
def _launcher():
    """(path, vendor) of the mpiexec next to this Python (the venv's), else on PATH; or None."""
    candidate = Path(sys.executable).parent / "mpiexec"
    path = str(candidate) if candidate.exists() else shutil.which("mpiexec")
    if path is None:
        return None
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    vendor = "openmpi" if ("Open MPI" in text or "OpenRTE" in text or "prte" in text.lower()) \
        else "mpich"
    return path, vendor


def mpiexec():
    """The mpiexec path, or skip (fail under CBN_REQUIRE_MPI=1) without mpiexec or mpi4py."""
    launcher = _launcher()
    missing = [] if launcher is not None else ["mpiexec"]
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        missing.append("mpi4py")
    if missing:
        if os.environ.get("CBN_REQUIRE_MPI") == "1":
            pytest.fail(f"CBN_REQUIRE_MPI=1 but {' and '.join(missing)} missing", pytrace=False)
        pytest.skip(f"{' and '.join(missing)} not installed (pip install mpi4py mpich)")
    return launcher[0]


def mpiexec_command(n):
    """``[mpiexec, flags..., -n, N]`` with the flags this MPI needs for N local ranks."""
    path = mpiexec()
    flags = []
    if _launcher()[1] == "openmpi":
        flags.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--allow-run-as-root")
    return [path, *flags, "-n", str(n)]


def mpi_env(**extra):
    """The environment of a test job: one OpenMP thread per rank, this checkout importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def run_ranks_script(n, script, *args, timeout=MPI_TIMEOUT, env=None, cwd=ROOT, check=True):
    """stdout of ``mpiexec -n N python -m mpi4py SCRIPT ARGS`` run in ``cwd`` (a relative
    SCRIPT is relative to the checkout); fails on a hang, and on an error unless ``check``
    is false.

    ``check=False`` is for jobs that end without ``MPI_Finalize`` on purpose (a collective
    left pending): MPICH's launcher then exits 0, Open MPI's reports an abnormal
    termination and exits non-zero, so the job's output has to say what happened.
    """
    script = ROOT / script
    command = [*mpiexec_command(n), sys.executable, "-m", "mpi4py", str(script), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=mpi_env() if env is None else env, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n {n} {script} {' '.join(args)} hung for {timeout} s:\n"
                    f"{exc.stdout}\n{exc.stderr}")
    if check:
        assert done.returncode == 0, f"mpiexec -n {n} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
