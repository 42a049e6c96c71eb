"""cbn: batch normalization on the CPU.

Cython+OpenMP kernels; PyTorch-exact layers (``cbn.BatchNorm1d/2d/3d``),
MindSpore-exact layers (``cbn.mindspore``), and ``cbn.SyncBatchNorm``, which
normalises with the statistics of the global batch across MPI processes.
``import cbn`` needs only NumPy: mpi4py and torch are imported on first use.
"""
from cbn import convert, functional, fuse, mindspore
from cbn._config import MAX_THREADS, get_num_threads, set_num_threads, threads
from cbn._version import __version__
from cbn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from cbn.checkpoint import load, save
from cbn.sync_batchnorm import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert", "functional",
           "fuse", "mindspore", "save", "load", "get_num_threads", "set_num_threads", "threads",
           "MAX_THREADS", "__version__"]
