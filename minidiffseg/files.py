"""Output files that are either complete or absent: write under a temporary name in the same folder,
then rename (atomic on POSIX), so an interrupted run never leaves half a file behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import UserError


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write bytes/text, or call `data(tmp_path)` to write the file, then rename into `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e} (check free space and permissions)") from None
    except BaseException:  # e.g. Ctrl-C in the middle of writing: no half file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and check that files can be written there; UserError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {path} is not writable ({e.strerror or e}): choose another --out") from None
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the `.NAME.PID.tmp` files that write_atomic left behind in a process that was killed
    (SIGKILL leaves no chance to clean up); files of processes still running are kept."""
    removed = 0
    for tmp in Path(folder).glob(".*.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True
