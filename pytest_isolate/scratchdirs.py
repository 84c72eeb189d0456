"""Host directories a session mounts on inside its own mount namespaces, and
the removal of those a killed session left behind.

A sandbox's new root is mounted on an empty host directory (the staging
directory), and every init's empty jail on another: in the sandbox's or the
init's own mount namespace, so the host never sees the mounts, but the
directories themselves are the host's. A session removes them when it ends;
nothing runs after a SIGKILL, so a killed session leaves them behind.

Each directory is flock(2)ed by the process that made it for as long as it
is in use: the kernel drops the lock when the last descriptor of it closes,
whatever killed the holder. The first directory a process makes sweeps the
temp dir for ours that nobody holds. Only empty directories are removed
(rmdir, never unlink): a path that is not what we made is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile

__all__ = ["PREFIXES", "LockedDir", "remove_stale"]

#: Name prefixes of the directories made here (sandbox staging, init jails).
PREFIXES = ("pytest-isolate-run-", "pytest-isolate-initd-")
#: Files of ours in such a directory (an /etc/hosts for the sandboxes): the
#: only files removed with it.
GENERATED = "generated-"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_swept = False


class LockedDir:
    """A new directory in the temp dir, locked until :meth:`remove`.

    The lock's descriptor is a directory: sandboxes never inherit it (test
    processes close every directory descriptor of pytest's, CVE-2024-21626),
    and closing their copies leaves pytest's lock in place.
    """

    def __init__(self, prefix: str) -> None:
        assert prefix in PREFIXES
        global _swept
        if not _swept:
            _swept = True
            remove_stale()
        while True:
            path = tempfile.mkdtemp(prefix=prefix)
            try:
                fd = os.open(path, _DIR_FLAGS)
            except FileNotFoundError:  # another session's sweep took it
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A sweep that locked it first may have removed it meanwhile.
                if _same_file(os.fstat(fd), path):
                    break
            except OSError:  # held by a sweep, or gone
                pass
            os.close(fd)
        self.path = path
        self._fd: int | None = fd

    def remove(self) -> None:
        """Remove the directory and the empty directories in it; release it."""
        if self._fd is None:
            return
        _remove_empty(self._fd, self.path)
        os.close(self._fd)
        self._fd = None


def remove_stale(directory: str | None = None) -> list[str]:
    """Remove the directories of ours in ``directory`` (the temp dir) that no
    live process holds; return their paths."""
    directory = directory or tempfile.gettempdir()
    uid = os.geteuid()
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(PREFIXES):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            fd = os.open(entry.path, _DIR_FLAGS)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(os.fstat(fd), entry.path) and _remove_empty(fd, entry.path):
                removed.append(entry.path)
        except OSError:  # held: in use
            pass
        finally:
            os.close(fd)
    return removed


def _same_file(st: os.stat_result, path: str) -> bool:
    try:
        other = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def _remove_empty(fd: int, path: str) -> bool:
    """rmdir the empty directories in the directory open as ``fd`` (relative
    to it: nothing is reached through a path that changed since), then
    ``path`` itself. Files, symlinks and fuller directories stay, and with
    them ``path``."""
    for name in os.listdir(fd):
        with contextlib.suppress(OSError):
            if name.startswith(GENERATED) and stat.S_ISREG(
                os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            ):
                os.unlink(name, dir_fd=fd)  # ours: a file the sandboxes are shown
            else:
                os.rmdir(name, dir_fd=fd)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True
