"""Files that are never half-written and never block: atomic writes and one-descriptor reads.

``write_atomically`` writes a temporary next to the target, fsyncs it, renames
it over the target and fsyncs the directory, so a reader (or a crash) sees the
old file or the new one; temporaries left by a killed writer are recognised by
their name (host, pid) and removed by the next write to the same path.
``read_regular`` reads a whole regular file through one descriptor, so a
concurrent rename cannot mix two files, and refuses a FIFO, device or
directory at once instead of blocking.  Used by ``cbn.checkpoint``.
"""
import contextlib
import hashlib
import os
import re
import secrets
import socket
import stat
import time

_STALE_SECONDS = 3600        # a temporary this old is debris even if its pid was reused
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


class FileProblem(ValueError):
    """A path that cannot be read or written as a regular file (the message says why)."""


def write_atomically(path, data):
    """Write ``data`` to a temporary file next to ``path``, sync it, rename it to ``path``."""
    target = os.path.realpath(os.fspath(path))  # a symlink is followed, as open() does
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(target).st_mode
        if stat.S_ISLNK(mode):
            raise FileProblem("a symlink loop")
        check_regular(mode)
    directory, name = os.path.split(target)
    _remove_stale_temporaries(directory, name)
    temporary = os.path.join(directory, f".{name}.cbn-{_HOST}-{os.getpid()}-"
                                        f"{secrets.token_hex(8)}.tmp")
    # 0o666 and O_EXCL: the umask applies as for any new file, and no existing
    # file (or symlink planted under the name) is ever opened.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        with open(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _remove_stale_temporaries(directory, name):
    """Delete the temporaries of saves to ``name`` whose process died (or that are very old).

    A temporary of a live save (this process, or another one on this host)
    is kept; one from another host is removed only by age.
    """
    pattern = re.compile(re.escape(f".{name}.cbn-") + r"([0-9a-f]{8})-(\d+)-[0-9a-f]{16}\.tmp\Z")
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = pattern.match(entry.name)
            if match is None:
                continue
            with contextlib.suppress(OSError):
                old = time.time() - entry.stat(follow_symlinks=False).st_mtime > _STALE_SECONDS
                if old or (match[1] == _HOST and os.name != "nt" and not _alive(int(match[2]))):
                    os.unlink(entry.path)  # (on Windows os.kill(pid, 0) would kill the process)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, and is someone else's
        pass
    return True


def _fsync_directory(directory):
    """Make the rename durable; platforms that cannot open a directory (Windows) skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_regular(mode):
    """Raise FileProblem unless ``mode`` is a regular file's."""
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
        raise FileProblem(f"is {kind}, not a regular file")


def read_regular(path):
    """The whole contents of the regular file ``path``, read through one descriptor."""
    check_regular(os.stat(path).st_mode)  # FileNotFoundError, PermissionError as is
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    with open(os.open(path, flags), "rb") as file:  # O_NONBLOCK: a FIFO never blocks
        info = os.fstat(file.fileno())
        check_regular(info.st_mode)
        size = info.st_size
        data = file.read(size)  # the whole file: allocates only its size
    if len(data) != size:
        raise FileProblem(f"shrank from {size} to {len(data)} bytes while being read")
    return data
