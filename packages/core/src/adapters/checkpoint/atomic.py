"""Atomic replacement of a saved folder, and reading a folder while saves replace it.

A save writes its files into a temporary sibling of the target folder and then makes that
sibling the target:

- on Linux, where the file system supports it, with one ``renameat2(RENAME_EXCHANGE)``
  system call that swaps the two folders: the target path always names a complete folder, the
  old one or the new one, so a reader never finds it absent;
- elsewhere (other platforms, file systems without the exchange) by renaming the old folder
  away and the new one in: two renames, between which the target is briefly absent (a reader
  then gets `CheckpointError` and may retry).

The user's own entries of the old folder (every entry no save of ours owns, dot-files and
sub-folders included) are hard-linked (or copied) into the new one first, so they stay
byte-identical. Temporary siblings (``.<name>.tmp-*``, ``.<name>.old-*``) that a killed save
left behind are removed by the next save into the same parent folder that finds no other save
running there (an advisory ``flock`` on the parent folder tells; without ``fcntl`` they stay).

Readers (`read_consistently`) compare the folder's identity before and after a read and read
again when a save replaced it in between; mixed reads are caught by the manifest (sha256 of
the bytes that are parsed) and retried the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ..errors import CheckpointError

T = TypeVar("T")

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: Errors meaning "this platform or file system cannot exchange": use the two-rename fallback.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP}
#: How often a reader reads again when a save replaced the folder during its read.
READ_ATTEMPTS = 8


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:  # pragma: no cover - no libc to load
        return None


_RENAMEAT2 = _renameat2()


def exchange(a: str, b: str) -> bool:
    """Swap the directory entries ``a`` and ``b`` in one step (``renameat2`` with
    ``RENAME_EXCHANGE``). True when done; False when the platform or file system cannot (the
    caller falls back to two renames). Other failures raise ``OSError``."""
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), b)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def replace_directory(
    target: str, write: Callable[[str], Any], owned: Callable[[str], set[str]]
) -> None:
    """Call ``write(tmp)`` on a new temporary sibling of ``target``, carry over the entries of
    the old ``target`` that ``owned(target)`` (the top-level names a save of ours owns there)
    does not list, and swap ``tmp`` in. On any failure ``target`` is left as it was."""
    target = os.path.abspath(os.fspath(target))
    parent, base = os.path.dirname(target), os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
        raise CheckpointError(f"{target!r} exists and is not a directory; choose another path")
    with _saving_in(parent, lambda: remove_leftovers(parent, base)):
        tmp = _make_temporary(parent, base, target)
        leftovers = [tmp]
        try:
            write(tmp)
            _carry_over(target, tmp, owned)
            leftovers += _swap(tmp, target)
        finally:
            for path in leftovers:
                if os.path.lexists(path):
                    shutil.rmtree(path, ignore_errors=True)


def _make_temporary(parent: str, base: str, target: str) -> str:
    """A new empty sibling folder ``.<base>.tmp-<8 characters>`` with the mode of ``target``
    (or the default mode for new folders: 0o777 less the umask), not mkdtemp's 0o700."""
    for _ in range(100):
        path = os.path.join(parent, f".{base}.tmp-{_random_suffix()}")
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IMODE(os.stat(target).st_mode))
        return path
    raise CheckpointError(f"could not create a temporary folder in {parent!r}")


def _random_suffix() -> str:
    return "".join(random.SystemRandom().choices("abcdefghijklmnopqrstuvwxyz0123456789_", k=8))


def _leftover_pattern(base: str) -> re.Pattern[str]:
    # exactly the names this module makes: 8 random characters, or 12 hex digits
    return re.compile(rf"^\.{re.escape(base)}\.(tmp-[a-z0-9_]{{8}}|old-[0-9a-f]{{12}})$")


def remove_leftovers(parent: str, base: str) -> list[str]:
    """Remove the temporary siblings of ``parent/base`` that an interrupted save left; call it
    only while no other save runs in ``parent``. Returns the names removed."""
    pattern = _leftover_pattern(base)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if pattern.match(name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


@contextlib.contextmanager
def _saving_in(parent: str, clean: Callable[[], Any]) -> Iterator[None]:
    """Hold a shared advisory lock on folder ``parent`` while a save runs there. A save that
    finds no other save running in ``parent`` (it gets the lock exclusively) first calls
    ``clean()``: no other save's temporary folder can exist then."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(parent, os.O_RDONLY)
        except OSError:
            fd = None
    if fd is None:
        yield
        return
    try:
        _lock(fd, clean)
        yield
    finally:
        os.close(fd)


def _lock(fd: int, clean: Callable[[], Any]) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            fcntl.flock(fd, fcntl.LOCK_SH)  # other saves run here: wait only for a cleaner
        return  # otherwise no locks on this file system: save without cleaning up
    try:
        clean()
    finally:
        fcntl.flock(fd, fcntl.LOCK_SH)


def _carry_over(target: str, tmp: str, owned: Callable[[str], set[str]]) -> None:
    """Hard-link (or copy) into ``tmp`` every top-level entry of ``target`` that a save of ours
    does not own, recursively and keeping symbolic links as links: files stay byte-identical."""
    try:
        entries = os.listdir(target)
    except (FileNotFoundError, NotADirectoryError):
        return
    ours = owned(target)
    for name in entries:
        if (name in ours and not name.startswith(".")) or os.path.lexists(os.path.join(tmp, name)):
            continue
        source, dest = os.path.join(target, name), os.path.join(tmp, name)
        try:
            if os.path.isdir(source) and not os.path.islink(source):
                shutil.copytree(source, dest, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(source, dest)
        except FileNotFoundError:  # a concurrent save swapped the folder away: carry the rest
            continue


def _link_or_copy(source: str, dest: str) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), dest)
        return
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _swap(tmp: str, target: str) -> list[str]:
    """Make ``tmp`` the folder ``target``; returns the paths that now hold previous folders
    (to remove). Concurrent swaps into one ``target`` each succeed; the last one stays."""
    parent, base = os.path.dirname(target), os.path.basename(target)
    backups: list[str] = []
    for _ in range(1000):
        try:
            os.rename(tmp, target)  # no target (or an empty one): one step
            return backups
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        try:
            if exchange(tmp, target):
                return [*backups, tmp]  # tmp now holds the previous folder
        except FileNotFoundError:
            continue  # another save moved the target away in between: rename again
        # fallback: rename the old folder away, then the new one in
        backup = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(target, backup)
        except FileNotFoundError:
            continue
        backups.append(backup)
        try:
            os.rename(tmp, target)
            return backups
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue  # another save put its folder there in between: move it away too
            os.rename(backups.pop(), target)  # put the previous folder back
            raise
    raise CheckpointError(f"could not replace {target!r}: too many concurrent saves")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def identity(path: str) -> tuple[int, ...] | None:
    """What changes when a save replaces folder ``path`` (device, inode and change times), or
    None when there is nothing at ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns)


def read_consistently(folders: Iterable[str], read: Callable[[], T]) -> T:
    """``read()``, read again (up to `READ_ATTEMPTS` times) when one of ``folders`` was
    replaced by a save while it ran, so that the result comes from one save. An ``OSError``
    (a file vanished with the old folder) becomes `CheckpointError`."""
    folders = list(folders)
    for attempt in range(READ_ATTEMPTS):
        before = [identity(f) for f in folders]
        try:
            result = read()
        except (CheckpointError, OSError) as error:
            changed = [identity(f) for f in folders] != before
            if changed and attempt + 1 < READ_ATTEMPTS:
                continue
            if isinstance(error, OSError):
                raise CheckpointError(
                    f"cannot read {folders[0]!r}: {error}"
                    + (" (it was being replaced by a save; try again)" if changed else "")
                ) from None
            raise
        if [identity(f) for f in folders] == before:
            return result
    raise CheckpointError(
        f"{folders[0]!r} was replaced by saves {READ_ATTEMPTS} times while being read; try "
        "again once the saves are done"
    )
