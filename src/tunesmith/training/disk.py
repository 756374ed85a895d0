"""A write that runs out of disk space ends in one line that says so, not in a serializer's traceback."""
from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import TunesmithError

# Free bytes below which a failed write is taken for a full disk: torch.save reports one as a RuntimeError
# ("iostream error", "unexpected pos") without an errno, and by then the disk has nothing left.
FULL_DISK_BYTES = 64 * 2**20


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write into `folder` ran out of disk space (ENOSPC, or next to nothing left free)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


@contextmanager
def full_disk_is_reported(run: Path, what: str, partial: Path | None = None):
    """Run a write of `what` into the run folder `run`; if the disk fills up, remove `partial` (the half-written
    folder, when there is one) and raise a TunesmithError naming the disk, what was being written and the fix.
    Any other failure propagates unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not disk_full(exc, run):
            raise
        written = folder_bytes(partial) if partial is not None else None
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        cut = f" ({written / 2**20:,.0f} MiB written before it ran out, removed)" if written is not None else ""
        raise TunesmithError(
            f"no space left on the disk holding {run} while writing {what}{cut}; free space or lower "
            "train.save_total_limit, then continue with --resume (from the last whole checkpoint, if any)") from exc
