"""Atomic file writes: a temp file beside the target, renamed over it once complete."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

#: the temp files :func:`atomic_write` makes: ``.<stem>.<8 chars of mkstemp>.tmp<suffix>``
_TEMP = re.compile(r"\.(?P<stem>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]*)?")


def _default_mode() -> int:
    """What ``open()`` would give a new file under this process's umask (``os.umask`` only reads by setting)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Writes ``target`` through ``write(tmp)`` into a temp file in the same folder (same suffix, so writers that read
    the format from it work), then ``os.replace``: a reader sees the old file or the whole new one. A failed or
    interrupted write leaves no temp file behind; the file and the rename are fsynced. The file gets the mode a plain
    ``open()`` would give it (safetensors and ``mkstemp`` create 0600 files, which a collaborator on a shared machine
    could not read). A write that fails for want of space (or any other I/O error, also one safetensors reports as its
    own ``SafetensorError``) raises an ``OSError`` of that errno naming ``target``; the earlier files stay whole."""
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())
        _fsync(tmp)  # the data on disk before the rename: a power loss leaves the old file or the new one, whole
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        code = _io_errno(err)
        if code is None:
            raise
        # a full disk must read as one (safetensors' own error is no OSError, and an OSError of the temp file's write
        # names no file), saying which result was not saved
        raise OSError(code, f"could not write {target}: {os.strerror(code)}") from err
    _fsync(target.parent, directory=True)  # and the rename itself
    return target


def remove_stale_temps(folder: str | os.PathLike, names: Callable[[str], bool]) -> list[str]:
    """Removes the temp files a killed :func:`atomic_write` left in ``folder`` (no cleanup runs after a SIGKILL or a
    power loss) for the targets whose file name ``names`` accepts; returns the names removed. Only for a folder that
    this process alone writes now (resuming a run): another writer's temp file would be taken from under it."""
    removed = []
    for path in Path(folder).iterdir() if Path(folder).is_dir() else ():
        match = _TEMP.fullmatch(path.name)
        if match and path.is_file() and names(match["stem"] + (match["suffix"] or "")):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


def _io_errno(err: BaseException) -> int | None:
    """The errno of an I/O error raised while writing a file: an ``OSError``'s, or the ``(os error N)`` that
    safetensors' ``SafetensorError`` ends with; None for anything else (a bad tensor, an interrupt)."""
    from safetensors import SafetensorError

    if isinstance(err, OSError):
        return err.errno or None
    match = re.search(r"\(os error (\d+)\)", str(err)) if isinstance(err, SafetensorError) else None
    return int(match.group(1)) if match else None


def _fsync(path: Path, *, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # a folder some platforms cannot open: the rename is still atomic
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)
