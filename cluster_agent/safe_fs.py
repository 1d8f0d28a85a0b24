"""Touching paths a job controls: never follow a link, never recurse on the stack, never raise out of a removal.

A job owns everything under its workspace: symbolic links to host files, FIFOs, directories thousands of levels
deep, names with newlines or bytes that are not UTF-8, directories it made unreadable. The agent runs as root, so
every operation here works on directory file descriptors (`dir_fd=`) with O_NOFOLLOW: a link planted anywhere in
the tree is removed as a link, never followed, and a directory swapped for a link between two calls is refused by
the kernel instead of being entered.

`remove_tree` is iterative (shutil.rmtree in Python 3.11 recurses once per level and raises RecursionError at
about 1000 levels) and holds at most MAX_OPEN_DEPTH directory descriptors: a deeper subtree is first moved up to
the top of the tree being removed, which shortens the path without changing what is removed.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["read_file_nofollow", "remove_tree", "write_new_file"]

# Directory descriptors held open at once while removing; deeper subtrees are moved up (see module docstring).
MAX_OPEN_DEPTH = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Removal:
    """What went wrong during one removal: counted, and the first cause kept for a single report."""

    def __init__(self) -> None:
        self.first_error: str | None = None
        self.failures = 0
        self._moved = 0

    def fail(self, what: str, exc: OSError) -> None:
        self.failures += 1
        if self.first_error is None:
            self.first_error = f"{what}: {exc.strerror or exc}"

    @property
    def moved(self) -> int:
        return self._moved

    def moved_name(self) -> str:
        self._moved += 1
        return f".radix-flatten-{os.getpid()}-{self._moved}"


def _ident(parent_fd: int, name: str) -> tuple[int, int] | None:
    try:
        info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _is_dir(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _rmdir(parent_fd: int, name: str, removal: _Removal, what: str) -> bool:
    """Remove the (emptied) directory; False, with the failure counted, when it stays."""
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        removal.fail(what, exc)
        return False
    return True


def _open_dir(parent_fd: int, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        # A directory the job made unreadable (mode 000) while the agent does not run as root: make it ours again.
        os.chmod(name, 0o700, dir_fd=parent_fd, follow_symlinks=False)
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def _clear_entry(
    fd: int, name: str, top_fd: int, depth: int, skipped: set[tuple[int, int]], removal: _Removal
) -> str | None:
    """Remove `name` in `fd` if it is not a directory, or an empty one; return it when it is a directory with
    something in it, to descend into (a too deep one is moved up to the top instead)."""
    try:
        os.unlink(name, dir_fd=fd)
        return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        if not _is_dir(fd, name):
            removal.fail(f"cannot remove {name!r}", exc)
            return None
    try:
        os.rmdir(name, dir_fd=fd)
        return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            removal.fail(f"cannot remove directory {name!r}", exc)
            return None
    ident = _ident(fd, name)
    if ident is None or ident in skipped:
        return None
    if depth >= MAX_OPEN_DEPTH:
        # Too deep to hold another descriptor: move the subtree up to the top, where it is emptied later.
        try:
            os.rename(name, removal.moved_name(), src_dir_fd=fd, dst_dir_fd=top_fd)
        except OSError as exc:
            removal.fail(f"cannot move deep directory {name!r} up", exc)
            skipped.add(ident)
        return None
    return name


def _list(fd: int, removal: _Removal) -> list[str]:
    try:
        return os.listdir(fd)
    except OSError as exc:
        removal.fail("cannot list a directory", exc)
        return []


def _empty_directory(top_fd: int, removal: _Removal) -> None:
    """Remove everything inside the directory open as `top_fd`, depth-first with an explicit stack. Each directory
    is listed once (a wide one costs no more than its entries); the top is listed again only while subtrees were
    moved up into it."""
    # Each frame: (directory fd, its name in the directory below it, names in it not looked at yet).
    stack: list[tuple[int, str, list[str]]] = [(top_fd, "", _list(top_fd, removal))]
    skipped: set[tuple[int, int]] = set()  # directories that could not be emptied: not entered again
    moved_seen = 0
    try:
        while stack:
            fd, name, names = stack[-1]
            child = None
            while names and child is None:
                child = _clear_entry(fd, names.pop(), top_fd, len(stack), skipped, removal)
            if child is not None:
                try:
                    child_fd = _open_dir(fd, child)
                except OSError as exc:
                    removal.fail(f"cannot open directory {child!r}", exc)
                    ident = _ident(fd, child)
                    if ident is not None:
                        skipped.add(ident)
                    continue
                stack.append((child_fd, child, _list(child_fd, removal)))
                continue
            if len(stack) == 1:
                if removal.moved > moved_seen:  # deep subtrees were moved up here meanwhile
                    moved_seen = removal.moved
                    names.extend(_list(top_fd, removal))
                    continue
                return  # the top itself is removed by the caller
            stack.pop()
            os.close(fd)
            parent_fd = stack[-1][0]
            if not _rmdir(parent_fd, name, removal, f"cannot remove directory {name!r}"):
                ident = _ident(parent_fd, name)
                if ident is not None:
                    skipped.add(ident)
    finally:
        for fd, _name, _names in stack[1:]:
            os.close(fd)


def remove_tree(path: Path) -> str | None:
    """Remove `path` (a directory tree, a file or a link; links are removed, never followed).

    Never raises: returns None when `path` is gone, else one line saying what could not be removed (the rest is
    removed all the same). The parent of `path` must be the agent's own directory (it is not re-checked).
    """
    removal = _Removal()
    try:
        parent_fd = os.open(path.parent, _DIR_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot open {path.parent}: {exc.strerror or exc}"
    try:
        name = path.name
        try:
            os.unlink(name, dir_fd=parent_fd)
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not _is_dir(parent_fd, name):
                return f"cannot remove {path}: {exc.strerror or exc}"
        try:
            top_fd = _open_dir(parent_fd, name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot open {path}: {exc.strerror or exc}"
        try:
            _empty_directory(top_fd, removal)
        except Exception as exc:  # noqa: BLE001 - a removal must never raise out of the agent
            removal.fail("unexpected error", OSError(str(exc)))
        finally:
            os.close(top_fd)
        _rmdir(parent_fd, name, removal, f"cannot remove {path}")
    finally:
        os.close(parent_fd)
    if removal.first_error is None:
        return None
    return f"{removal.failures} entr{'y' if removal.failures == 1 else 'ies'} of {path} could not be removed " \
           f"(first: {removal.first_error})"


def read_file_nofollow(path: Path, limit: int) -> bytes | None:
    """Up to `limit` bytes of a regular file, never following a link at its last component and never blocking on
    a FIFO. None when it is missing, not a regular file, a link, or larger than `limit`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        data = os.read(fd, limit + 1)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create `path` with `data`; fails (FileExistsError) rather than write through anything already there,
    link or not. Raises OSError (full disk, permissions)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fchmod(fd, mode)  # the umask must not narrow what the job's user may read
    finally:
        os.close(fd)
