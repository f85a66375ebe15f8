"""An experiment folder lock: one train.py run per exps/<exp> at a time.

The lock is a JSON file ({"pid", "host", "started"}) created with O_EXCL, so that of two runs starting together
only one creates it. A lock whose process is gone (same host, PID no longer running) is stale and is taken over;
a lock held on another host cannot be checked from here and always refuses. Taking over a stale lock is not
atomic: two runs that both find the same stale lock in the same instant can both start.
"""
import json
import os
import socket
import time
from pathlib import Path


class ExperimentLocked(RuntimeError):
    """Another run holds the experiment folder."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(path: Path) -> dict:
    """The lock file's content; an unreadable file (cut short while written) counts as held by nobody known."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def is_stale(holder: dict) -> bool:
    """A lock of this host whose process no longer runs."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def describe_holder(holder: dict) -> str:
    if not holder:
        return "an unknown process (the lock file is unreadable)"
    return f"PID {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"


class ExperimentLock:
    """The lock file of one experiment folder, held from `acquire` until `release`."""

    def __init__(self, path: Path, took_over: dict = None):
        self.path = Path(path)
        self.took_over = took_over

    @classmethod
    def acquire(cls, path) -> "ExperimentLock":
        """Create the lock file, taking over a stale one; raise ExperimentLocked naming the holder otherwise."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if cls._create(path):
            return cls(path)
        holder = read_holder(path)
        if not is_stale(holder):
            raise ExperimentLocked(
                f"{path.parent} is in use by another train.py run: {path} is held by {describe_holder(holder)}. "
                f"Wait for that run to finish, or, if it is no longer running, delete {path}")
        path.unlink(missing_ok=True)
        if not cls._create(path):
            raise ExperimentLocked(f"{path.parent} was locked by another run while a stale lock was removed: "
                                   f"{path} is held by {describe_holder(read_holder(path))}")
        return cls(path, took_over=holder)

    @staticmethod
    def _create(path: Path) -> bool:
        """Create the lock file with this process as holder; False when it exists already."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        return True

    def release(self):
        """Remove the lock file if it is still this process's."""
        holder = read_holder(self.path)
        if (holder.get("pid"), holder.get("host")) == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)
