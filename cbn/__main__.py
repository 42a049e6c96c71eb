"""``python -m cbn``: version, OpenMP, threads and MPI availability."""
import importlib.util
import sys

import numpy as np

import cbn
from cbn import _threads


def mpi_status():
    if importlib.util.find_spec("mpi4py") is None:
        return "not available (pip install mpi4py mpich, or `pip install cbn[mpi]`)"
    try:
        from mpi4py import MPI
    except Exception as exc:  # an mpi4py without a working MPI library
        return f"mpi4py present but MPI failed to load: {exc}"
    vendor, version = MPI.get_vendor()
    library = MPI.Get_library_version().replace("\0", "").strip().splitlines()[0]  # NUL: Open MPI
    return (f"available: mpi4py {importlib.import_module('mpi4py').__version__}, "
            f"{vendor} {'.'.join(map(str, version))} ({library}); "
            f"{MPI.COMM_WORLD.Get_size()} process(es) in COMM_WORLD")


def main():
    print(f"cbn {cbn.__version__} (Python {sys.version.split()[0]}, NumPy {np.__version__})")
    print(f"OpenMP: {'on' if _threads.openmp_enabled() else 'off (serial kernels)'}")
    print(f"threads: {cbn.get_num_threads()}")
    print(f"MPI: {mpi_status()}")


if __name__ == "__main__":
    main()
