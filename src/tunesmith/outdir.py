"""Writing an output folder without losing a user's work (design.md section 7).

train, export and merge share three steps:

1. `check_target`, before anything is touched: the folder must not be, contain or lie inside one of
   the command's inputs (recipe, data, model, adapters), must not be the working directory, home or
   one of their parents, and must be empty unless the user allowed replacing it.
2. `staged` (export, merge): the new folder is written into a hidden temporary sibling; only when it
   is complete is the old folder renamed aside, the new one renamed into place, and the old removed.
3. `in_place` (train, whose checkpoints must sit in the real folder for --resume): the old folder is
   renamed aside first and put back if the new run fails before writing a checkpoint.

A failed command leaves the old folder as it was, and no temporary, partial or empty folder behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from .errors import TunesmithError
from .models import BUILTIN_MODELS, builtin_cache_dir

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Input:
    """A file or folder a command reads, named the way the user knows it ("recipe", "data file")."""

    what: str
    path: Path


def inputs(what: str, refs: Union[PathLike, Iterable[PathLike], None]) -> list[Input]:
    """The refs that are local files or folders; hub ids and the `general` corpus name nothing on disk."""
    if refs is None:
        return []
    refs = [refs] if isinstance(refs, (str, Path)) else list(refs)
    paths = [Path(r).expanduser() for r in refs if r]
    return [Input(what, p) for p in paths if p.exists()]


def model_input(ref: str, what: str = "model") -> list[Input]:
    """Where a model reference lives on disk: the built-in model's cache folder, or a local folder or file."""
    if ref in BUILTIN_MODELS:
        return inputs(what, builtin_cache_dir(ref))
    return inputs(what, ref)


def check_target(
    target: Path, reads: Iterable[Input], *, may_replace: bool, flag: str, example: str, taken: str
) -> None:
    """Refuse, with a one-line TunesmithError, a target whose writing could destroy an input or earlier work.

    `flag` is how the user named the folder ("output_dir", "--out"), `example` a safe folder to suggest,
    and `taken` the message for a non-empty folder that may not be replaced.
    """
    if target.exists() and not target.is_dir():
        raise TunesmithError(f"{flag} '{target}' is a file; choose a folder, such as {example}")
    resolved = target.resolve()
    if _is_protected(resolved):
        raise TunesmithError(
            f"{flag} '{target}' is the working directory, your home or one of their parents, which tunesmith never "
            f"replaces or writes into; choose a dedicated folder, such as {example}"
        )
    for item in reads:
        _check_against(target, resolved, item, flag, example)
    if target.exists() and any(target.iterdir()) and not may_replace:
        raise TunesmithError(f"{flag} '{target}' {taken}")


def _is_protected(resolved: Path) -> bool:
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    return resolved in (cwd, home) or resolved in cwd.parents or resolved in home.parents


def _check_against(target: Path, resolved: Path, item: Input, flag: str, example: str) -> None:
    source = item.path.resolve()
    if resolved == source:
        raise TunesmithError(f"{flag} '{target}' is the {item.what} '{item.path}'; write to a new folder, such as {example}")
    if resolved in source.parents:
        raise TunesmithError(
            f"{flag} '{target}' contains the {item.what} '{item.path}', and an output folder is replaced as a whole; "
            f"write to a folder that holds no inputs, such as {example}"
        )
    if source in resolved.parents:
        raise TunesmithError(
            f"{flag} '{target}' is inside the {item.what} '{item.path}', and tunesmith never writes into its inputs; "
            f"write to a folder outside it, such as {example}"
        )


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Yield a new hidden sibling of `target` to write into; when the block ends without error, it replaces
    `target` (the old folder is removed only after the new one is in place). On error it is removed, and
    so are the parent folders this call created."""
    created = _missing_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    _ordinary_permissions(tmp)
    try:
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


@contextmanager
def in_place(target: Path, keep_partial: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield `target`, new and empty, to write into directly; an existing folder is renamed to a hidden
    sibling first. When the block ends without error the old folder is removed. On error the new folder
    is kept if `keep_partial(target)` says it holds work worth keeping (a checkpoint to resume), and the
    old one is removed; otherwise the new folder is removed and the old one renamed back."""
    created = _missing_parents(target)
    aside = _aside(target) if target.exists() else None
    if aside is not None:
        os.rename(target, aside)
    try:
        target.mkdir(parents=True)
        yield target
    except BaseException:
        if keep_partial(target):
            _discard(aside)
        else:
            shutil.rmtree(target, ignore_errors=True)
            if aside is not None:
                os.rename(aside, target)
            _remove_empty(created)
        raise
    _discard(aside)


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = _aside(target)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _discard(old)


def _aside(target: Path) -> Path:
    """A free hidden name next to `target` for its old contents."""
    name = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    name.rmdir()
    return name


def _discard(folder: Optional[Path]) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _missing_parents(target: Path) -> list[Path]:
    """The folders above `target` that do not exist yet, innermost first."""
    return [p for p in target.absolute().parents if not p.exists()]


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first; stop at the first one that holds something
        try:
            folder.rmdir()
        except OSError:
            break


def _ordinary_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder; the result is an ordinary one, as mkdir would make it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
