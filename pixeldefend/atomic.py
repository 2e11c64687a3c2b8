"""Atomic file and directory writes: an interrupted run never leaves half a file.

Files: written to a temporary sibling, then `os.replace`d onto the target, which is
atomic on POSIX and Windows when both share a file system. The target is what the user
meant, not the directory entry: a symlink is followed (its target is replaced, the link
stays), a non-regular file (`/dev/null`, a FIFO, a terminal) is written straight through
rather than replaced by a regular file, and an existing file keeps its permission bits.

Directories (model bundles, checkpoints, attack output): see `atomic_dir`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # POSIX; on Windows saves are not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give the final file or folder
    the permissions an ordinary write would have (0666/0777 less the umask)."""
    os.chmod(path, mode & ~_umask())


def resolve_target(target: str | os.PathLike[str]) -> Path:
    """The file a write to `target` should change: symlinks (chains, relative, dangling)
    are followed to the path they name."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(target))))


def is_write_through(target: str | os.PathLike[str]) -> bool:
    """True for an existing non-regular, non-directory file (device, FIFO, socket): such a
    target is opened and written in place, never replaced."""
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a path to write; on success it becomes `target` in one step.

    The yielded path is a temporary sibling of the (symlink-resolved) target, renamed onto
    it on success with the old file's permission bits, or, for a device node or FIFO, the
    target itself (written through; there is nothing to rename).
    """
    real = resolve_target(target)
    try:
        existing: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        existing = None
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(target))
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        yield real
        return
    real.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=suffix + ".tmp", dir=real.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if existing is None:
            _publish(tmp_path, 0o666)
        else:
            os.chmod(tmp_path, stat.S_IMODE(existing.st_mode))
            with contextlib.suppress(OSError):  # keep the owner when we may (root)
                if (existing.st_uid, existing.st_gid) != (os.getuid(), os.getgid()):
                    os.chown(tmp_path, existing.st_uid, existing.st_gid)
        os.replace(tmp_path, real)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------- directories


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file beside a bundle (or other swapped directory): `.NAME.lock`."""
    target = resolve_target(target)
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def dir_lock(target: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `.NAME.lock` beside `target`.

    Every writer of a swapped directory (and of single files inside a bundle) takes it,
    so concurrent saves queue instead of racing, and anything left in a temporary
    directory of this target while the lock is held is a leftover of a killed writer.
    The kernel drops the lock when its holder dies, kill -9 included.
    """
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _exchange_function() -> Any:
    """renameat2 (Linux, glibc >= 2.28) or renamex_np (macOS), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        at_fdcwd, rename_exchange = -100, 2

        def exchange(a: bytes, b: bytes) -> int:
            return fn(at_fdcwd, a, at_fdcwd, b, rename_exchange)

        return exchange
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):  # pragma: no cover
        fn = libc.renamex_np
        rename_swap = 2
        return lambda a, b: fn(a, b, rename_swap)
    return None  # pragma: no cover


_EXCHANGE = _exchange_function()


def exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one atomic step; False where the OS or the file
    system cannot (the caller then falls back to two renames)."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _leftovers(target: Path) -> list[Path]:
    """Temporary or moved-aside copies of `target` from earlier (killed) writers: exactly
    the names `atomic_dir` makes (mkdtemp's random suffix, or `old-PID`), nothing else."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp-[A-Za-z0-9_]{{8}}|old-\d+)")
    try:
        return [p for p in target.parent.iterdir()
                if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []


def only_entries(names: frozenset[str]) -> Callable[[Path], bool]:
    """`replaceable` for `atomic_dir`: a folder holding nothing but these names."""
    return lambda folder: all(p.name in names for p in folder.iterdir())


class NotOursError(FileExistsError):
    """`atomic_dir` was asked to replace a folder its caller does not recognise as its own."""


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *,
               replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `target` as a whole.

    The swap deletes the old folder, so the caller must say what it may replace:
    `replaceable(target)` is asked, under the lock, whenever `target` is a non-empty
    folder, and a False refuses (`NotOursError`) before any work, so no user folder is
    ever swapped away, whichever entry point (CLI or Python) asked.

    Why a directory swap, not files replaced one by one (config last) or a symlink to
    versioned directories: a bundle's weights, config and calibration must always belong
    to the same model (file by file, a reader could see new weights with an old config),
    and the bundle path must stay a plain directory (the shipped bundles are, tools and
    `git` expect one). Linux's `renameat2(RENAME_EXCHANGE)` (macOS: `renamex_np`) swaps
    the new directory and the old one in a single atomic step, so at every instant the
    path holds one complete bundle, old or new; the old copy is then deleted. Where the
    OS cannot exchange, two renames leave the path missing for an instant (the only
    fallback there is).

    Writers are serialised by `dir_lock`; temporary directories are created only while
    holding it, so a `.NAME.tmp-*` or `.NAME.old-*` found under the lock is a leftover of
    a killed writer and is removed. The lock file `.NAME.lock` stays (it is empty).
    """
    target = resolve_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with dir_lock(target):
        if target.is_dir() and any(target.iterdir()) and not replaceable(target):
            raise NotOursError(errno.EEXIST, "not a folder pixeldefend may replace (it holds "
                               "files pixeldefend did not write)", str(target))
        for stale in _leftovers(target):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
            _publish(tmp, 0o777)
            for child in tmp.rglob("*"):
                _publish(child, 0o777 if child.is_dir() else 0o666)
            if target.is_dir():
                if not exchange(tmp, target):  # pragma: no cover - other OSes
                    old = target.with_name(f".{target.name}.old-{os.getpid()}")
                    os.replace(target, old)
                    os.replace(tmp, target)
                    tmp = old
            elif target.exists():
                raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory",
                                         str(target))
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
