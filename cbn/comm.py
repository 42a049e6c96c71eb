"""The only place cbn communicates: one self-checking collective over two transports.

SyncBatchNorm needs one thing from its process group: the element-wise sum of
a float64 buffer.  ``Collective.sum`` adds, in the same Allreduce, a
fixed-size header (its size does not depend on the number of ranks) with
which every rank verifies that all ranks are in the same call:

* the kind of collective (forward statistics, backward sums, gradients,
  the process_groups check, a layer's handshake), a per-group call counter,
  the payload length, the dtype and a tag (``num_features``), each field
  as (value, value**2) pieces of 16 bits: the sums over the ranks equal
  ``size * (v, v**2)`` if and only if every rank holds ``v``;
* per exception class (ValueError, TypeError, RuntimeError, any other), the
  number of failing ranks and the sum of their ranks and squared ranks, so
  that a bad input on one rank raises on every rank instead of leaving the
  others blocked, with the failing rank named.

When a field differs or a rank failed, every rank takes the same decision
from the same sums and raises before any statistic is used; a second,
error-path-only exchange names each rank's values and error message.  A
rank that never arrives turns into ``TimeoutError`` after ``timeout``
seconds instead of an endless wait.

Buffers of one layer have one length (forward and backward), and a layer's
first collective is a header-only handshake (num_features, payload length):
ranks whose payload lengths differ would otherwise post Allreduces of
different sizes, which MPI leaves undefined (MPICH: the longer rank waits
for ever) and gloo answers by aborting the process.

Transports (``_MPITransport``: an mpi4py communicator, ``Iallreduce`` polled
up to the timeout; ``_TorchTransport``: a ``torch.distributed`` process
group, ``all_reduce(async_op=True)`` on a float64 tensor sharing the NumPy
buffer's memory, ``wait(timeout)``) only move bytes; the protocol above is
written once, here.  ``import cbn`` imports neither mpi4py nor torch:
mpi4py is imported on first use, ``torch.distributed`` only when torch is
already imported.
"""
import abc
import datetime
import math
import os
import sys
import time
import zlib

import numpy as np

#: ``process_group=LOCAL`` (the string ``"local"``): this process alone, on purpose.
LOCAL = "local"

TIMEOUT_VARIABLE = "CBN_SYNC_TIMEOUT"
ABORT_VARIABLE = "CBN_ABORT_ON_EXCEPTION"
#: Seconds a collective waits for the slowest rank unless CBN_SYNC_TIMEOUT says otherwise.
DEFAULT_TIMEOUT = 300.0

#: Seconds a collective polls with ``sched_yield`` before it polls with sleeps.
_BUSY_WAIT = 2e-3
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))

# --- the kinds of collective and the header ---------------------------------------

FORWARD, BACKWARD, GRADIENTS, GROUPS, HANDSHAKE = 1, 2, 3, 4, 5
KIND_NAMES = {FORWARD: "forward statistics", BACKWARD: "backward sums",
              GRADIENTS: "gradients", GROUPS: "process_groups check",
              HANDSHAKE: "layer handshake"}
DTYPE_CODES = {"float16": 1, "float32": 2, "float64": 3, "bfloat16": 4}
_DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
_DTYPE_NAMES[0] = "-"

_FIELDS = ("kind", "call", "length", "dtype", "tag")
_PIECES = (1, 1, 3, 1, 1)          # 16-bit pieces per field (length: 48 bits)
_N_PIECES = sum(_PIECES)
_ERROR_CLASSES = (ValueError, TypeError, RuntimeError)   # then "any other"
_N_ERROR_KINDS = len(_ERROR_CLASSES) + 1
#: float64 slots of the header: (piece, piece**2) per piece, then 3 per error kind.
HEADER = 2 * _N_PIECES + 3 * _N_ERROR_KINDS
HEADER_BYTES = 8 * HEADER
_MESSAGE = 160                     # bytes of each failing rank's message, error path only
_CALL_SLOT = 2 * _PIECES[0]        # where the call counter's piece sits
_DTYPE_CODE_CACHE = {}


def _pieces(values):
    out = []
    for value, n in zip(values, _PIECES):
        value = int(value)
        for _ in range(n):
            out.append(value & 0xFFFF)
            value >>= 16
    return out


def _error_kind(error):
    """The header slot of ``error``: ValueError, TypeError, RuntimeError or any other.

    An error that is both a RuntimeError and a ValueError (cbn.torch's
    ``ChannelError``: torch's type and cbn's) counts as a RuntimeError, so the
    other ranks raise what torch users catch.
    """
    if isinstance(error, RuntimeError):
        return _ERROR_CLASSES.index(RuntimeError)
    for i, cls in enumerate(_ERROR_CLASSES):
        if isinstance(error, cls):
            return i
    return len(_ERROR_CLASSES)


def dtype_code(dtype):
    """The header's code of a NumPy or torch dtype (0: none)."""
    if dtype is None:
        return 0
    name = str(dtype)
    if name.startswith("torch."):
        return DTYPE_CODES.get(name[len("torch."):], 0)
    try:
        return DTYPE_CODES.get(np.dtype(dtype).name, 0)
    except TypeError:
        return 0


# --- validation -------------------------------------------------------------------

def check_timeout(timeout, name="timeout"):
    """``timeout`` as a float: a finite number of seconds > 0 (else TypeError/ValueError)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer,
                                                               np.floating)):
        raise TypeError(f"{name} must be a number of seconds, got {type(timeout).__name__} "
                        f"{timeout!r}")
    value = float(timeout)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {timeout!r}")
    return value


def resolve_timeout(timeout=None):
    """The timeout in seconds: ``timeout``, else CBN_SYNC_TIMEOUT, else 300 (validated)."""
    if timeout is not None:
        return check_timeout(timeout, "timeout")
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None or not text.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"the environment variable {TIMEOUT_VARIABLE} must be a finite "
                         f"number of seconds > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"the environment variable {TIMEOUT_VARIABLE} must be a finite "
                         f"number of seconds > 0, got {text!r}")
    return value


def _torch_distributed():
    """torch.distributed when torch is already imported and distributed is available, else None."""
    if sys.modules.get("torch") is None:
        return None
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() else None


def _is_torch_group(group):
    dist = _torch_distributed()
    return dist is not None and isinstance(group, dist.ProcessGroup)


def _is_mpi_comm(group):
    return hasattr(group, "Iallreduce") and hasattr(group, "Get_size")


def check_process_group(process_group):
    """Raise TypeError unless ``process_group`` is None, LOCAL, an mpi4py communicator or a
    torch.distributed ProcessGroup."""
    if process_group is None or (isinstance(process_group, str) and process_group == LOCAL):
        return process_group
    if _is_mpi_comm(process_group) or _is_torch_group(process_group) \
            or isinstance(process_group, Transport):
        return process_group
    raise TypeError(f"process_group must be None (the default world), {LOCAL!r} (this "
                    f"process alone), an mpi4py communicator or a torch.distributed "
                    f"ProcessGroup, got {type(process_group).__name__} {process_group!r}")


# --- MPI --------------------------------------------------------------------------

def mpi():
    """The mpi4py.MPI module, or None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


def require_mpi():
    MPI = mpi()
    if MPI is None:
        raise ImportError("process groups need mpi4py and an MPI library: "
                          "pip install mpi4py mpich (or `pip install cbn[mpi]`)")
    return MPI


def world():
    """MPI.COMM_WORLD, or None without mpi4py (a single process)."""
    MPI = mpi()
    return None if MPI is None else MPI.COMM_WORLD


# --- transports -------------------------------------------------------------------

class _Timeout(Exception):
    """A transport waited longer than its timeout."""


class Transport(abc.ABC):
    """Moves bytes: ``allreduce(buf, timeout)`` sums a float64 buffer in place over the group.

    ``size``, ``rank``; ``key`` identifies the group (call counters are per
    group); ``is_world`` says the group is the launcher's whole world.
    """
    size = 1
    rank = 0
    key = None
    is_world = False
    name = "transport"

    @abc.abstractmethod
    def allreduce(self, buf, timeout):
        """Sum ``buf`` in place over the group within ``timeout`` seconds (else ``_Timeout``)."""


class _MPITransport(Transport):
    name = "MPI"

    def __init__(self, comm, is_world=False):
        self.comm = comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self._MPI = mpi() or require_mpi()
        try:
            self.key = ("mpi", comm.py2f())
        except Exception:  # noqa: BLE001 - a wrapper without py2f
            self.key = ("mpi-object", id(comm))
        self.is_world = is_world

    def allreduce(self, buf, timeout):
        MPI = self._MPI
        request = self.comm.Iallreduce(MPI.IN_PLACE, [buf, MPI.DOUBLE], op=MPI.SUM)
        if request.Test():
            return
        start = time.monotonic()
        deadline = start + timeout
        pause = 20e-6
        while not request.Test():
            now = time.monotonic()
            if now - start < _BUSY_WAIT:
                # Ranks may outnumber cores: hand the core to a rank that has
                # work, and come back at once when none has.  Sleeping here
                # instead made every collective cost up to a millisecond.
                _yield()
            else:  # a long wait (a slow rank): stop burning the core
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
            if now > deadline:
                raise _Timeout()


class _TorchTransport(Transport):
    name = "torch.distributed"

    def __init__(self, group, dist, is_world=False):
        import torch
        self.group, self._dist, self._torch = group, dist, torch
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.key = ("torch", id(group))
        self._keep = group  # the key's id stays unique while we live
        self.is_world = is_world

    def allreduce(self, buf, timeout):
        tensor = self._torch.from_numpy(buf)  # shares the buffer's memory
        work = self._dist.all_reduce(tensor, group=self.group, async_op=True)
        try:
            work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as exc:
            if "imed out" in str(exc) or "imeout" in str(exc):
                raise _Timeout() from exc
            raise RuntimeError(f"SyncBatchNorm: torch.distributed all_reduce failed: "
                               f"{exc}") from exc


def _transport(process_group):
    """(Transport or None for one process, how it was resolved) for ``process_group``."""
    if isinstance(process_group, Transport):
        return process_group
    dist = _torch_distributed()
    if process_group is None:
        if dist is not None and dist.is_initialized():
            return _TorchTransport(dist.group.WORLD, dist, is_world=True)
        comm = world()
        return None if comm is None else _MPITransport(comm, is_world=True)
    if dist is not None and isinstance(process_group, dist.ProcessGroup):
        return _TorchTransport(process_group, dist,
                               is_world=process_group is dist.group.WORLD)
    MPI = mpi()
    is_world = MPI is not None and isinstance(process_group, MPI.Comm) \
        and process_group == MPI.COMM_WORLD
    return _MPITransport(process_group, is_world=is_world)


# --- no silent singletons ---------------------------------------------------------

#: Variables by which launchers tell a process it is one of several.
LAUNCH_VARIABLES = (
    ("WORLD_SIZE", "torchrun / torch.distributed"),
    ("PMI_SIZE", "MPICH's hydra mpiexec (and Intel MPI)"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("MV2_COMM_WORLD_SIZE", "MVAPICH2"),
    ("SLURM_STEP_NUM_TASKS", "Slurm's srun"),
)


def launch_size():
    """(variable, launcher, size) of the first launch variable saying size > 1, or None."""
    for variable, launcher in LAUNCH_VARIABLES:
        text = os.environ.get(variable, "")
        try:
            size = int(text)
        except ValueError:
            continue
        if size > 1:
            return variable, launcher, size
    return None


def _check_not_a_silent_singleton(transport):
    """Raise when the launcher says several processes but the group resolved has one."""
    found = launch_size()
    if found is None:
        return
    variable, launcher, size = found
    if transport is None:
        got = "mpi4py is not installed and torch.distributed is not initialised"
    elif transport.name == "MPI":
        got = "MPI.COMM_WORLD has 1 process"
    else:
        got = "the torch.distributed world has 1 process"
    if transport is None and variable != "WORLD_SIZE":
        fix = "install mpi4py (pip install mpi4py mpich, or `pip install cbn[mpi]`)"
    elif variable == "WORLD_SIZE":
        fix = ("call torch.distributed.init_process_group('gloo') before training (or pass "
               "process_group=<a torch.distributed ProcessGroup or mpi4py communicator>)")
    else:
        fix = ("install mpi4py built against the MPI of your mpiexec (pip install mpi4py "
               "mpich, or build mpi4py with that MPI's mpicc), and run the launcher of the "
               "same MPI")
    raise RuntimeError(
        f"SyncBatchNorm: {variable}={size} says this process is one of {size} "
        f"(launched by {launcher}), but {got}: the statistics would silently be this "
        f"process's alone. Fix: {fix}. For local statistics on purpose, pass "
        f"process_group={LOCAL!r}.")


def collective(process_group=None, timeout=None):
    """The Collective of ``process_group``, or None when the group is this process alone.

    ``process_group``: None (torch.distributed's WORLD when initialised, else
    MPI.COMM_WORLD when mpi4py is installed, else one process), ``LOCAL``, an
    mpi4py communicator or a torch.distributed ProcessGroup.  Called at the
    first synchronising training forward; raises RuntimeError when the
    launch environment says several processes but the world resolved has one.
    """
    check_process_group(process_group)
    timeout = resolve_timeout(timeout)
    if isinstance(process_group, str):  # LOCAL
        return None
    transport = _transport(process_group)
    if transport is None or transport.size == 1:
        if transport is None or transport.is_world:
            _check_not_a_silent_singleton(transport)
        return None
    if transport.name == "MPI":
        _install_abort_hook()
    return Collective(transport, timeout)


# --- ending the job when a rank dies -----------------------------------------------

_hook_installed = False


def _abort_enabled():
    text = os.environ.get(ABORT_VARIABLE, "1").strip().lower()
    return text not in ("0", "false", "no", "off")


def _install_abort_hook():
    """On the first synchronisation over MPI: an uncaught exception aborts the MPI job.

    Without it, under plain ``mpiexec python script.py`` a rank that dies from
    an exception leaves the others waiting in their next collective for the
    full timeout.  The hook prints the traceback (the previous hook runs
    first), then calls ``MPI.COMM_WORLD.Abort(1)``.  CBN_ABORT_ON_EXCEPTION=0
    turns it off.
    """
    global _hook_installed
    if _hook_installed or not _abort_enabled():
        return
    _hook_installed = True
    previous = sys.excepthook

    def abort_on_uncaught_exception(kind, value, traceback):
        try:
            previous(kind, value, traceback)
        finally:
            MPI = mpi()
            if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized() \
                    and _abort_enabled():
                try:
                    sys.stderr.write(f"cbn: uncaught {kind.__name__} on MPI rank "
                                     f"{MPI.COMM_WORLD.Get_rank()}: aborting the job "
                                     f"(set {ABORT_VARIABLE}=0 to disable)\n")
                    sys.stderr.flush()
                    sys.stdout.flush()
                finally:
                    MPI.COMM_WORLD.Abort(1)

    sys.excepthook = abort_on_uncaught_exception


# --- process_groups ----------------------------------------------------------------

def split_world(process_groups, timeout=None):
    """The sub-communicator of this rank for ``process_groups``, a partition of the world.

    ``process_groups`` is a list of lists of world ranks; every rank must call
    this (it is collective over the world) with the same groups.  The groups
    are checked collectively before ``Split``: groups that are invalid on any
    rank, or differ between ranks, raise on every rank.
    """
    MPI = require_mpi()
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    error, fingerprint, groups = None, 0, None
    try:
        groups = _parse_groups(process_groups, size)
        fingerprint = zlib.crc32(repr(sorted(sorted(g) for g in groups)).encode()) & 0xFFFF
    except ValueError as exc:
        error = exc
    if size > 1:
        Collective(_MPITransport(comm, is_world=True), resolve_timeout(timeout)).check(
            GROUPS, tag=fingerprint, error=error,
            describe=f"process_groups={process_groups!r}")
    elif error is not None:
        raise error
    color = next(i for i, group in enumerate(groups) if rank in group)
    return comm.Split(color, sorted(groups[color]).index(rank))


def _parse_groups(process_groups, size):
    try:
        if isinstance(process_groups, (str, bytes)):
            raise TypeError
        groups = [[_rank(r) for r in group] for group in process_groups]
    except (TypeError, ValueError):
        raise ValueError(f"process_groups must be a list of lists of ranks, "
                         f"got {process_groups!r}") from None
    members = sorted(r for group in groups for r in group)
    if not all(groups) or members != list(range(size)):
        raise ValueError(f"process_groups must partition the world ranks 0..{size - 1} "
                         f"(each rank in exactly one non-empty group), got {process_groups!r}")
    return groups


def _rank(r):
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise TypeError
    return int(r)


# --- the protocol ------------------------------------------------------------------

class GroupError(RuntimeError):
    """The ranks of a process group are not in the same collective (a header field differs)."""


class Collective:
    """Sums of float64 buffers over a process group, with a self-checking header and a timeout.

    ``group``: a Transport, an mpi4py communicator or a torch.distributed
    ProcessGroup.  Buffers from ``buffer(length)`` hold ``HEADER`` slots then
    ``length`` payload values; ``sum`` fills the header, sums, checks, and
    returns the summed payload.
    """

    _calls = {}  # per-group call counters, by transport key

    def __init__(self, group, timeout=None):
        self._templates = {}  # header values by (kind, length, dtype, tag), call left blank
        self.transport = group if isinstance(group, Transport) else _transport(group)
        self.size, self.rank = self.transport.size, self.transport.rank
        self.timeout = resolve_timeout(timeout)

    def buffer(self, length):
        """A zeroed float64 buffer: ``HEADER`` slots then ``length`` payload values."""
        return np.zeros(HEADER + length)

    def _next_call(self):
        key = self.transport.key
        call = Collective._calls.get(key, 0) + 1
        Collective._calls[key] = call
        return call

    def check(self, kind, length=0, tag=0, dtype=None, error=None, describe=""):
        """A header-only collective: raise on every rank unless every rank agrees."""
        self.sum(self.buffer(0), kind, tag=tag, dtype=dtype, error=error,
                 declared_length=length, describe=describe)

    def sum(self, buf, kind, tag=0, dtype=None, error=None, declared_length=None,
            describe=""):
        """Sum ``buf`` over the group in place; return the payload (the values after the header).

        ``error`` is this rank's exception, if it failed: it joins the
        collective with its error counted, so that every rank raises.
        """
        length = buf.size - HEADER if declared_length is None else declared_length
        code = _DTYPE_CODE_CACHE.get(dtype)
        if code is None:
            code = _DTYPE_CODE_CACHE[dtype] = dtype_code(dtype)
        # The hot path copies prepared headers: a dozen NumPy scalar
        # operations here would cost more than the Allreduce on two ranks.
        key = (kind, length, code, tag)
        template = self._templates.get(key)
        if template is None:
            pieces = _pieces((kind, 0, length, code, tag))
            mine = np.zeros(HEADER)
            mine[0:2 * _N_PIECES:2] = pieces
            mine[1:2 * _N_PIECES:2] = [p * p for p in pieces]
            template = self._templates[key] = (mine, (self.size * mine).tolist())
        mine, expected = template
        call = self._next_call()
        piece = float(call & 0xFFFF)
        if error is not None:
            buf[:] = 0.0
        buf[:HEADER] = mine
        buf[_CALL_SLOT] = piece
        buf[_CALL_SLOT + 1] = piece * piece
        if error is not None:
            slot = 2 * _N_PIECES + 3 * _error_kind(error)
            buf[slot:slot + 3] = (1.0, self.rank, self.rank * self.rank)
        header = buf[:HEADER].copy() if error is not None else None
        try:
            self.transport.allreduce(buf, self.timeout)
        except _Timeout:
            raise TimeoutError(
                f"SyncBatchNorm: rank {self.rank} waited {self.timeout:g} s for the other "
                f"{self.size - 1} rank(s) of its process group in the {KIND_NAMES[kind]} "
                f"collective (call {call}). Every rank must call every SyncBatchNorm layer "
                f"the same number of times in training. The collective stays pending: "
                f"abort the job (it cannot be cancelled).") from None
        total = buf[:HEADER].tolist()
        n = self.size
        if error is not None or total[_CALL_SLOT] != n * piece or \
                total[_CALL_SLOT + 1] != n * piece * piece or \
                total[:_CALL_SLOT] != expected[:_CALL_SLOT] or \
                total[_CALL_SLOT + 2:] != expected[_CALL_SLOT + 2:]:
            if header is None:
                header = mine.copy()
                header[_CALL_SLOT], header[_CALL_SLOT + 1] = piece, piece * piece
            self._verify(np.array(total), header, (kind, call, length, code, tag), error,
                         describe, buf.size == HEADER)
        return buf[HEADER:]

    # -- reading the header --

    def _verify(self, total, mine, fields, error, describe, header_only):
        n = self.size
        differs = []
        i = 0
        for name, count in zip(_FIELDS, _PIECES):
            for _ in range(count):
                if total[2 * i] != n * mine[2 * i] or total[2 * i + 1] != n * mine[2 * i + 1]:
                    if name not in differs:
                        differs.append(name)
                i += 1
        errors = total[2 * _N_PIECES:].reshape(_N_ERROR_KINDS, 3)
        failed = int(round(errors[:, 0].sum()))
        if not differs and not failed:
            return
        if "length" in differs and not header_only:
            # Payloads of different lengths: the transport may not have
            # completed on every rank, so no second exchange is safe.
            self._raise_length(fields, total)
        if "tag" in differs and "length" in differs:
            differs.remove("length")  # num_features says it in the user's words
        rows = self._gather(fields, error)
        if failed:
            self._raise_error(rows, errors, error)
        self._raise_mismatch(differs, rows, fields, describe)

    def _gather(self, fields, error):
        """Every rank's fields, exception kind and message (the error path only)."""
        width = len(_FIELDS) + 1 + _MESSAGE
        table = np.zeros((self.size, width))
        row = table[self.rank]
        row[:len(_FIELDS)] = fields
        if error is not None:
            row[len(_FIELDS)] = 1 + _error_kind(error)
            text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:_MESSAGE]
            row[len(_FIELDS) + 1:len(_FIELDS) + 1 + len(text)] = np.frombuffer(text, np.uint8)
        try:
            self.transport.allreduce(table.reshape(-1), self.timeout)
        except _Timeout:
            raise TimeoutError(f"SyncBatchNorm: rank {self.rank} timed out exchanging the "
                               f"details of a failed collective") from None
        return table

    @staticmethod
    def _message(row):
        raw = row[len(_FIELDS) + 1:].astype(np.uint8).tobytes().rstrip(b"\0")
        return raw.decode("utf-8", "replace")

    def _raise_error(self, rows, errors, error):
        codes = rows[:, len(_FIELDS)].astype(int)
        failed = [int(r) for r in np.flatnonzero(codes)]
        if error is not None:
            message = f"rank {self.rank} of {self.size}: {error}"
            try:
                new = type(error)(message)
            except Exception:  # noqa: BLE001 - a class that takes other arguments
                new = RuntimeError(f"{type(error).__name__} on {message}")
            raise new from error
        kinds = {int(c) - 1 for c in codes[failed]}
        kind = _ERROR_CLASSES[kinds.pop()] if len(kinds) == 1 and \
            max(codes[failed]) - 1 < len(_ERROR_CLASSES) else RuntimeError
        details = "; ".join(f"rank {r}: {self._message(rows[r])}" for r in failed[:8])
        raise kind(f"SyncBatchNorm: rank(s) {failed} of the process group (size {self.size}) "
                   f"failed (bad input or state there); every rank raises. {details}")

    def _raise_mismatch(self, differs, rows, fields, describe):
        parts = []
        for name in differs:
            j = _FIELDS.index(name)
            groups = {}
            for r in range(self.size):
                groups.setdefault(int(rows[r, j]), []).append(r)
            shown = ", ".join(f"{self._show(name, v, rows)} on rank(s) {ranks}"
                              for v, ranks in groups.items())
            parts.append(f"{self._field_name(name, fields[0])} differs ({shown})")
        hint = {GROUPS: " Every rank must pass the same process_groups.",
                GRADIENTS: " Every rank must call allreduce_gradients with the same model "
                           "structure."}.get(
            fields[0], " Every rank must call the same SyncBatchNorm layers (same "
                       "num_features and dtype) in the same order, the same number of times, "
                       "forward and backward, in training.")
        mine = f" This rank has {describe}." if describe else ""
        raise GroupError(f"SyncBatchNorm: the ranks of the process group (size {self.size}) "
                         f"are not in the same collective: {'; '.join(parts)}. Nothing was "
                         f"updated.{hint}{mine}")

    @staticmethod
    def _field_name(name, kind):
        if name == "kind":
            return "the collective"
        if name == "call":
            return "the call counter"
        if name == "tag":
            return {GRADIENTS: "the number of parameters", GROUPS: "process_groups"}.get(
                kind, "num_features")
        if name == "length":
            return "the number of gradient values" if kind == GRADIENTS else "the payload length"
        return name

    @staticmethod
    def _show(name, value, rows):
        if name == "kind":
            return KIND_NAMES.get(value, str(value))
        if name == "dtype":
            return _DTYPE_NAMES.get(value, str(value))
        if name == "tag" and int(rows[0, 0]) == GROUPS:
            return f"groups #{value:04x}"
        return str(value)

    def _raise_length(self, fields, total):
        n, mine = self.size, fields[2]
        raise GroupError(
            f"SyncBatchNorm: the ranks of the process group (size {n}) are not in the same "
            f"collective: the payload length differs (this rank {self.rank}: "
            f"{KIND_NAMES.get(fields[0], fields[0])} of {mine} values). Ranks whose "
            f"payload is longer may wait until their timeout. Every rank must call the same "
            f"SyncBatchNorm layers in the same order, the same number of times.")
