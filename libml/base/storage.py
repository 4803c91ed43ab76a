"""Full disks and read-only folders as one line instead of a traceback.

Two tools, used at every place that writes files the user asked for (datasets, checkpoints,
exports, predictions, the quickstart's work folder):

- `check_writable(path, need_bytes)` before the work starts: the nearest existing folder of
  `path` must be writable and, when the size is known, hold `need_bytes` free;
- `disk_errors(path, need_bytes)` around the write: ENOSPC/EDQUOT (disk full) and
  EROFS/EACCES/EPERM (read-only) met inside, whether raised by Python (OSError) or by
  TensorFlow's file system (an OpError whose text carries the strerror), become a UserError
  naming the path and the space needed. Paths (or glob patterns) in `cleanup`, the
  half-written output, are removed first, so nothing half written stays behind.
"""
import contextlib
import errno
import os
import shutil
from typing import Callable, Iterable, Optional, Union

from libml.base.errors import UserError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
FULL_TEXT = ("No space left on device", "Disk quota exceeded")
READ_ONLY_TEXT = ("Read-only file system", "Permission denied", "Operation not permitted")
# What check_writable asks on top of the estimate: estimates are rough (PNG sizes, metadata).
SPACE_MARGIN = 1.1


def existing_folder(path: str) -> str:
    """The nearest existing folder at or above `path` (the one a write would need)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def free_bytes(path: str) -> int:
    return shutil.disk_usage(existing_folder(path)).free


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024.0
    return f"{count:.1f} TB"


def _full_message(path: str, need_bytes: int, what: str, fix: str) -> str:
    try:
        free = f"{human_bytes(free_bytes(path))} free"
    except OSError:
        free = "free space unknown"
    need = f"needs about {human_bytes(need_bytes)}, " if need_bytes else ""
    return f"no space left on the disk of {path} for {what} ({need}{free}): {fix}"


def _read_only_message(path: str, what: str, fix: str, reason: str = "read-only") -> str:
    return f"cannot write {what} to {path} ({reason}): {fix}"


DEFAULT_FIX = "free space there or choose a folder on another disk"


def check_writable(path: str, need_bytes: int = 0, what: str = "the output",
                   fix: str = DEFAULT_FIX) -> None:
    """UserError now if `path` (a file or folder to be created) cannot be written or its disk
    has less than `need_bytes` (x SPACE_MARGIN) free."""
    folder = existing_folder(path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(_read_only_message(path, what, "make the folder writable or choose "
                                                       "another one", reason=f"{folder} is read-only"))
    if need_bytes and free_bytes(folder) < need_bytes * SPACE_MARGIN:
        raise UserError(_full_message(path, int(need_bytes * SPACE_MARGIN), what, fix))


def fault_kind(error: BaseException) -> Optional[str]:
    """"full", "read-only" or None (not a disk fault) for an OSError or a TensorFlow error."""
    code = getattr(error, "errno", None)
    if isinstance(error, OSError) and code in FULL_ERRNOS:
        return "full"
    if isinstance(error, OSError) and code in READ_ONLY_ERRNOS:
        return "read-only"
    if type(error).__module__.startswith("tensorflow"):
        text = getattr(error, "message", None) or str(error)
        if any(t in text for t in FULL_TEXT):
            return "full"
        if any(t in text for t in READ_ONLY_TEXT):
            return "read-only"
    return None


def fault_message(error: BaseException, path: str, need_bytes: int = 0,
                  what: str = "the output", fix: str = DEFAULT_FIX) -> Optional[str]:
    kind = fault_kind(error)
    if kind == "full":
        return _full_message(path, need_bytes, what, fix)
    if kind == "read-only":
        reason = "read-only file system" if "Read-only" in str(error) or getattr(
            error, "errno", None) == errno.EROFS else "permission denied"
        return _read_only_message(path, what, fix, reason=reason)
    return None


def remove_quietly(patterns: Iterable[str]) -> None:
    """Removes files and folders matching the glob patterns (plain paths match themselves)."""
    import glob
    for path in sorted({p for pattern in patterns for p in glob.glob(pattern)}):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        except OSError:
            pass


@contextlib.contextmanager
def disk_errors(path: str, need_bytes: Union[int, Callable[[], int]] = 0,
                what: str = "the output", fix: str = DEFAULT_FIX, cleanup: Iterable[str] = ()):
    """Turns a full or read-only disk met in the block into a one-line UserError (after
    removing `cleanup`); other errors pass through unchanged. `need_bytes` may be a function,
    called at the failure (e.g. to extrapolate from what was written)."""
    try:
        yield
    except Exception as e:      # noqa: BLE001 (TensorFlow's OpError is not an OSError)
        if fault_kind(e) is None:
            raise
        remove_quietly(cleanup)         # first, so that the space it held counts as free
        need = need_bytes() if callable(need_bytes) else need_bytes
        raise UserError(fault_message(e, path, need, what, fix)) from None
