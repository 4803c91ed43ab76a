"""One trainer per run folder.

`RunLock(folder)` holds `{folder}/run.lock` for as long as a trainer works in the folder. The
lock is an flock(2) on that file, so the kernel releases it when the holder exits or is
killed: a lock left by a dead process is stale by construction and the next launch takes it
over (and says so). The file records the holder (pid, host, start time, command line), so a
second launch names who holds the folder in its one-line error. What a killed holder left
half written is removed by the next holder (libml.base.files.remove_stale_temps,
libml.run.checkpoint_files.remove_incomplete).
"""
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import List, Optional

from libml.base.errors import UserError

LOCK_NAME = "run.lock"


def holder_record(argv: Optional[List[str]] = None) -> dict:
    """What a lock file says about its holder: this process."""
    return dict(pid=os.getpid(), host=socket.gethostname(),
                started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                command=" ".join(sys.argv if argv is None else argv)[:300])


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (its lock file is empty)"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
    return text + (f" ({holder['command']})" if holder.get("command") else "")


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        return json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


class RunLock:
    """Exclusive use of a run folder. `acquire()` raises UserError (exit code 2) naming the
    holder if another live process has it; `taken_over` is the record of a dead holder whose
    lock this one replaced (or None)."""

    def __init__(self, folder: str, fix: str = "wait for it to finish, or stop it, or pass "
                                                  "another --train_dir"):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fix = fix
        self.taken_over: Optional[dict] = None
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        from libml.base.storage import disk_errors
        with disk_errors(self.folder, what="the run folder"):
            os.makedirs(self.folder, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = _read_holder(fd)
                    os.close(fd)
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise UserError(f"{self.folder} is in use by {describe_holder(holder)}: "
                                    f"{self.fix}") from None
                # The previous holder may have deleted the file between our open and our lock:
                # then we hold a lock on a file nobody else will see. Start again.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                break
            previous = _read_holder(fd)
            self.taken_over = previous or None
            data = json.dumps(holder_record(), sort_keys=True).encode() + b"\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Deletes the lock file (while still holding it, so no one locks a deleted file)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    def __del__(self):
        self.release()
