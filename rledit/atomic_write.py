"""Writing a file or folder whole: under a hidden temporary name first, renamed when complete.

A process killed mid-write leaves only its temporary `.NAME.partial-PID`; the next write to the same
path removes those of processes that no longer run, so kills do not pile up hidden copies on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def partial_path(path: Path) -> Path:
    """This process's temporary name for `path`, removing any left by processes that have died."""
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return path.parent / f".{path.name}.partial-{os.getpid()}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
