"""File output that never leaves half a file nor replaces one by accident, JSON, progress bars.

Every writer of the project goes through ``atomic_path``: the data is written to a temporary
name beside the target and renamed only when complete; an existing target is refused unless
the caller passes ``overwrite`` (the user's --overwrite, or files the program owns such as
accuracy.json and the Extend manifest); a full or read-only disk is one line
(libml.base.storage), and the temporary file is removed.
"""
import contextlib
import glob
import json
import os
import re
import time
from typing import Iterable, List, Optional

import numpy as np

from libml.base.errors import UserError


def check_overwrite(path: str, overwrite: bool, flag: str = "--overwrite") -> None:
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists: pass {flag} to replace it, or choose another name")


def require_free(paths: Iterable[str], overwrite: bool) -> None:
    """Checks every output before any work starts, so nothing is half written."""
    for path in paths:
        check_overwrite(path, overwrite)


@contextlib.contextmanager
def atomic_path(path: str, overwrite: bool = False, need_bytes=0):
    """Yields a temporary path beside `path`; renames it to `path` only if the block succeeds.
    A full or read-only disk met meanwhile is a one-line UserError naming `path` (and
    `need_bytes`, an int or a function called at the failure, when known)."""
    from libml.base.storage import disk_errors
    check_overwrite(path, overwrite)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with disk_errors(path, need_bytes, what=os.path.basename(path), cleanup=[glob.escape(tmp)]):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            yield tmp
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


TEMP_NAME = re.compile(r"\.tmp-(\d+)$")     # atomic_path's temporaries: {path}.tmp-{pid}
OLD_NAME = re.compile(r"\.old-(\d+)$")      # export_model's previous export while it swaps
STALE_AGE = 600.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str, recursive: bool = True, min_age: float = STALE_AGE,
                       now: Optional[float] = None, folders: bool = False) -> List[str]:
    """Removes the `*.tmp-PID` files that atomic_path writers killed mid-write left under
    `folder` (with `folders`, also the `*.tmp-PID/` folders of killed folder writers: a run's
    export), when no process PID exists here and they have not changed for `min_age` seconds;
    returns their paths. The age guards folders shared with other hosts, whose pids mean nothing here; a
    caller that holds the folder's run lock passes min_age=0. With `folders`, an `X.old-PID/`
    folder (the previous export, set aside by a writer killed between its two renames) is put
    back as X when X is missing, and removed otherwise."""
    import shutil
    now = time.time() if now is None else now
    removed = []

    def stale(name, path, pattern=TEMP_NAME):
        match = pattern.search(name)
        if not match or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            return False
        try:
            return now - os.path.getmtime(path) >= min_age
        except FileNotFoundError:
            return False

    for root, dirs, files in os.walk(folder):
        for name in list(dirs) if folders else []:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            if stale(name, path):
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
                removed.append(path)
            elif stale(name, path, OLD_NAME):
                target = os.path.join(root, name[:OLD_NAME.search(name).start()])
                if os.path.exists(target):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.replace(path, target)
                dirs.remove(name)
                removed.append(path)
        for name in files:
            path = os.path.join(root, name)
            if stale(name, path):
                try:
                    os.remove(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
        if not recursive:
            break
    return sorted(removed)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def text_cell(text: str) -> str:
    """`text` for a CSV cell that a spreadsheet shows as text: a leading = + - @ (or tab, CR),
    which would make it a formula, is preceded by a quote (OWASP's CSV injection advice)."""
    text = str(text)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_json(path: str, value, overwrite: bool = False) -> None:
    """Writes JSON atomically (sorted keys, 2-space indent, numpy scalars as numbers)."""
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")


def read_json(path: str, fix: str):
    """Reads a JSON file; an unreadable or malformed one is a UserError ending with `fix`."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable {path} ({e}): {fix}") from None


def _json_default(value):
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return str(value)


def progress(iterable=None, desc: Optional[str] = None, total: Optional[int] = None,
             unit: str = "img", **options):
    """A tqdm progress bar on stderr over `iterable` (or, without one, a bar to `.update()` up
    to `total`). Without `desc` there is no bar: `iterable` itself (or None) comes back."""
    if not desc:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=1.0,
                **options)
