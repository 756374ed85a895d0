"""jemalloc (or tcmalloc) for tunesmith's processes, where the system has one.

Training frees and reallocates hundreds of MiB of activations every micro batch. glibc's malloc keeps much of
that freed memory in its arenas, so a process's peak RSS runs well above what it ever held at once: the
default quickstart run peaked at 1888 MiB with glibc and 1615 MiB with jemalloc at no cost in speed
(bench/allocator.py). An allocator can only be chosen before the process starts, so the `tunesmith` command
(and `python -m tunesmith`, `python -m tunesmith.demo`) restarts itself once with the library in LD_PRELOAD,
before anything heavy is imported.

`TUNESMITH_ALLOCATOR` chooses: `auto` (the default: jemalloc, else tcmalloc, else glibc's malloc), `system`
(glibc's malloc, no restart), or the path of a malloc library to preload. A notebook picks its allocator when
it starts: `LD_PRELOAD=$(python -m tunesmith.allocator) jupyter lab`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import TunesmithError

CHOICE = "TUNESMITH_ALLOCATOR"
LIBRARIES = ("libjemalloc.so.2", "libjemalloc.so", "libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def search_dirs() -> list[Path]:
    """Where the libraries live: the Python environment (conda installs jemalloc there), then the system's."""
    dirs = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    machine = os.uname().machine
    dirs += [Path(f"/usr/lib/{machine}-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]
    return dirs


def find_allocator(dirs: list[Path] | None = None) -> Path | None:
    for name in LIBRARIES:
        for folder in dirs if dirs is not None else search_dirs():
            if (folder / name).is_file():
                return folder / name
    return None


def chosen_library(env: dict) -> Path | None:
    """The library `TUNESMITH_ALLOCATOR` asks for (None: glibc's malloc)."""
    choice = env.get(CHOICE, "auto").strip() or "auto"
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice == "auto":
        return find_allocator()
    path = Path(choice)
    if not path.is_file():
        raise TunesmithError(f"{CHOICE}={choice}: no such file; set it to auto, system, or the path of a malloc "
                             "library such as /usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    return path


def preload_env(env: dict) -> dict | None:
    """`env` with the chosen allocator added to LD_PRELOAD; None when there is nothing to add (glibc chosen,
    no library found, or it is preloaded already)."""
    library = chosen_library(env)
    preloaded = env.get("LD_PRELOAD", "").replace(":", " ").split()
    if library is None or str(library) in preloaded:
        return None
    return {**env, "LD_PRELOAD": " ".join([*preloaded, str(library)])}


def restart_with_allocator(module: str) -> None:
    """Replace this process by `python -m module` with the same arguments and the allocator preloaded; return
    when there is nothing to change. Called first thing by the command-line entry points."""
    try:
        env = preload_env(dict(os.environ))
    except TunesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def keep_oversize_pages(largest_tensor_bytes: int) -> bool:
    """Let jemalloc keep the pages of freed oversize allocations instead of returning them at once, when the run's
    largest activation tensor is oversize; True when set.

    jemalloc serves requests above `opt.oversize_threshold` (8 MiB) from a dedicated arena that gives freed
    pages straight back to the kernel, so the next tensor of that size faults every page in again. Training
    on long examples frees and reallocates such tensors in every layer (at 4096 tokens a dropout mask or a
    cast is tens of MiB): keeping them made a 4096-token run of the built-in model 1.32x faster at 13% more
    peak memory (bench/jemalloc_decay.py). On the default run, whose activations stay under the threshold,
    keeping them added 25 MiB and no speed, so below it nothing changes. The arena's decay set to -1 keeps
    its freed pages for reuse; the other arenas keep their default. A process without jemalloc is left alone.
    """
    import ctypes

    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return False

    def read(name: bytes, value):
        size = ctypes.c_size_t(ctypes.sizeof(value))
        return mallctl(name, ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0

    threshold, automatic = ctypes.c_size_t(0), ctypes.c_uint(0)
    if not (read(b"opt.oversize_threshold", threshold) and read(b"opt.narenas", automatic)):
        return False
    if largest_tensor_bytes <= threshold.value:
        return False
    never = ctypes.c_ssize_t(-1)
    # the oversize arena is created after the automatic ones, so its index is their count
    return all(mallctl(f"arena.{automatic.value}.{what}_decay_ms".encode(), None, None, ctypes.byref(never),
                       ctypes.c_size_t(ctypes.sizeof(never))) == 0 for what in ("dirty", "muzzy"))


if __name__ == "__main__":
    found = chosen_library(dict(os.environ))
    print(found or "")
