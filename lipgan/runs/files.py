"""Files that never lie: atomic writes, one-line OS errors, sha256 digests, an advisory lock.

Every helper here turns an ``OSError`` into ``LipganError("PATH: reason")`` (the CLI prints
``lipgan: error: PATH: reason`` and exits 2) and leaves no partial file behind. No torch import:
the report reads run folders on machines without it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from lipgan.errors import LipganError

#: the suffix of temporary files; a killed writer's leftovers are ``.NAME.*.part``
PART_SUFFIX = ".part"


def os_error(exc: OSError, path: str | os.PathLike | None = None) -> LipganError:
    """``LipganError("PATH: reason")`` for an ``OSError`` (the path it names, else ``path``)."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or type(exc).__name__
    hint = {
        errno.ENOSPC: "; free some space and run the command again (nothing was overwritten)",
        errno.EDQUOT: "; free some space and run the command again (nothing was overwritten)",
        errno.EROFS: "; choose a writable place",
        errno.EACCES: "; choose a place you may write to (or fix the permissions)",
        errno.EPERM: "; choose a place you may write to (or fix the permissions)",
        errno.ENOTDIR: " (a file is where a folder is expected); choose another path",
        errno.EEXIST: " (a file is where a folder is expected); choose another path",
        errno.EISDIR: " (a folder is where a file is expected); choose another path",
    }.get(exc.errno or 0, "")
    return LipganError(f"{where}: {reason}{hint}")


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` with a one-line error when a file is in the way or the place is not
    writable."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file (or a dangling link) where the folder should be
        raise LipganError(
            f"{path}: a file is where a folder is expected; choose another path"
        ) from None
    except OSError as exc:
        raise os_error(exc, path) from None
    return path


def check_writable(folder: str | os.PathLike) -> Path:
    """Make ``folder`` and prove a file can be created in it (a temporary file, removed at
    once), so a command that writes only after minutes of work fails before them. Root ignores
    file modes, so ``os.access`` would say yes where a read-only mount says no."""
    folder = make_dirs(folder)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".probe.", suffix=PART_SUFFIX)
    except OSError as exc:
        raise os_error(exc, folder) from None
    os.close(fd)
    os.unlink(tmp)
    return folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, then
    ``os.replace`` (atomic on POSIX). On any failure (a full disk included) the temporary file is
    deleted and the old ``path``, if any, is untouched. The file gets ``mode`` less the umask
    (``mkstemp`` alone would make it 0600)."""
    path = Path(path)
    make_dirs(path.parent)
    if path.is_dir():
        raise LipganError(f"{path}: a folder is where a file is expected; choose another path")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PART_SUFFIX)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise os_error(exc, path) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def regular_file(path: str | os.PathLike, max_bytes: int, what: str) -> int:
    """The size of ``path`` after checking that it is a regular file (not a folder, device or
    pipe: a link to /dev/zero would read forever) of at most ``max_bytes``; else one line."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise os_error(exc, path) from None
    if not stat.S_ISREG(info.st_mode):
        raise LipganError(f"{path}: not a regular file (a folder, device or pipe); pass {what}")
    if info.st_size > max_bytes:
        raise LipganError(f"{path}: {info.st_size} bytes; {what} of at most {max_bytes} are read")
    return info.st_size


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes; a missing, unreadable or folder path is a one-line LipganError."""
    path = Path(path)
    if path.is_dir():
        raise LipganError(f"{path}: a folder is where a file is expected")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise os_error(exc, path) from None


def read_text(path: str | os.PathLike) -> str:
    """The file as UTF-8 text; not UTF-8 (a binary or hand-edited file) is one line too."""
    path = Path(path)
    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LipganError(
            f"{path}: not UTF-8 text (byte {exc.start}); restore or delete the file"
        ) from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise os_error(exc, path) from None
    return h.hexdigest()


def remove_partials(*folders: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.NAME.*.part``) a killed writer left in ``folders``."""
    gone = []
    for folder in map(Path, folders):
        if folder.is_dir():
            for f in folder.glob(f".*{PART_SUFFIX}"):
                f.unlink(missing_ok=True)
                gone.append(f)
    return gone


class FolderLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``FOLDER/.lock``: one writer per folder.

    The lock file holds the owner's pid, for the message a second writer gets. The lock goes
    with the process (the kernel drops it when the file is closed, also on SIGKILL), so a
    crashed writer never leaves a folder locked. The file itself is never deleted (deleting a
    lock file races with a process that has just opened it).
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False) -> FolderLock:
        """Take the lock; with ``wait``, block until the holder lets go, else a one-line
        LipganError naming the holder's pid."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_error(exc, self.path.parent) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            raise LipganError(
                f"{self.path.parent} is being written by another lipgan process (pid {owner}); "
                "wait for it to finish or stop it, then run the command again"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the message; a full disk must not stop the writer here
        self._fd = fd
        return self

    def release(self) -> None:
        # Closing is releasing (the last descriptor of the open file goes). No LOCK_UN: a
        # process forked while holding the lock shares it, and its LOCK_UN would free the
        # parent's lock too.
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a writer dropped without close() still lets others in
        self.release()
