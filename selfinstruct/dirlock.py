"""One writer per output directory: an exclusive lock held for a command's lifetime."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from selfinstruct.errors import OutputError

LOCK_FILE = ".selfinstruct.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - non-Unix: no lock, as before
    fcntl = None


class DirectoryLock:
    """flock on DIR/.selfinstruct.lock: the kernel drops it when the holder dies, so a dead process's lock is taken over."""

    def __init__(self, directory: Path, command: str = "", beside: bool = False) -> None:
        directory = Path(directory)
        # A dataset folder (filter --out, export --to) is uploaded as it is: its lock sits beside it, not in it.
        self.path = directory.parent / f".{directory.name}{LOCK_FILE}" if beside else directory / LOCK_FILE
        self.directory = directory
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or exit 2 at once naming its holder."""
        if fcntl is None:
            return
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise OutputError(
                    f"{self.directory}: in use by another selfinstruct process ({holder})",
                    "wait for it to finish or stop it, or choose another directory; two writers would mix their records",
                ) from None
            # The holder before us unlinks the file as it releases: a lock on an unlinked file guards nothing.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        # Who holds it, for the message a second process prints; the command is already masked by the caller.
        info = {"pid": os.getpid(), "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info, ensure_ascii=False) + "\n").encode("utf-8"), 0)
        self._fd = fd

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.directory}: cannot create the lock file {self.path.name} ({exc.strerror or exc})",
                              "choose another directory or fix its permissions") from None

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict) or "pid" not in info:
            return "holder unknown"
        text = f"PID {info['pid']}, started {info.get('started', '?')}"
        return f"{text}: {info['command']}" if info.get("command") else text

    def release(self) -> None:
        """Unlink the lock file, then let it go (acquire checks it still locks the file at its path, so this is safe)."""
        if self._fd is not None:
            try:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:
                    pass  # the directory lost its write permission: the file stays, and the next run takes it over
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
