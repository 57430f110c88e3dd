"""One run per output: an exclusive OS lock on ``OUTPUT.lock`` for a whole run.
Two runs of one output at once (two cron entries, a slow night overlapping the
next) would each send the rows the other has not journaled yet, and mix their
journal lines; the second run stops at once instead (OutputBusy, exit 3)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from pathlib import Path

from batchrun.errors import OutputBusy

log = logging.getLogger("batchrun")

_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
"""What flock answers on a file system that has no locks."""


def lock_path(output: Path) -> Path:
    """The file a run locks for as long as it works on ``output`` (its PID inside)."""
    return output.with_name(output.name + ".lock")


class OutputLock:
    """An exclusive lock on one output for a whole run: ``fcntl.flock`` on
    ``OUTPUT.lock``, which holds the PID (and host) of the run. The kernel drops
    the lock when the process ends, however it ends, so a lock file left by a
    killed run blocks nobody. Two runs on one output at once would each send the
    rows the other has not journaled yet, and mix their journal lines."""

    def __init__(self, output: Path) -> None:
        """Take the lock, or raise OutputBusy naming the run that holds it."""
        import fcntl  # here, so that importing this module works where fcntl does not exist

        self.output = output
        self.path = lock_path(output)
        self.fd = -1
        while self.fd < 0:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # The run before us removes the file before it lets go: a lock on
                # a file no longer at this path would exclude nobody, so try again.
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.fd, fd = fd, -1
            except BlockingIOError:
                raise self._busy(fd) from None
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
                # A file system without locks (some network and FUSE mounts): run unlocked.
                log.warning(
                    "cannot lock %s (%s): nothing stops a second run on this output at the same time",
                    self.path,
                    exc.strerror,
                    extra={"event": "no_lock"},
                )
                self.fd, fd = fd, -1
            finally:
                if fd >= 0:
                    os.close(fd)
        with contextlib.suppress(OSError):  # the PID only serves the message above
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def _busy(self, fd: int) -> OutputBusy:
        try:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
        except OSError:
            holder = []
        pid = holder[0] if holder else ""
        host = holder[1] if len(holder) > 1 and holder[1] != socket.gethostname() else ""
        who = (f"PID {pid}" if pid else "a run still starting") + (f" on {host}" if host else "")
        stop = f" (kill {pid})" if pid and not host else ""
        return OutputBusy(
            f"{self.output} is in use: another batchrun run ({who}) is working on it and holds "
            f"{self.path}. Two runs of one output would pay twice for the same rows, so this one "
            f"sent nothing. Wait for that run to end, or stop it{stop}, then run the same command again."
        )

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (in that order: see __init__)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1
