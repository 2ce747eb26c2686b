"""The agent's artifact store: uploaded files by sha256, kept within a size cap and off a full disk.

A board's disk is small (a Raspberry Pi's SD card) and every upload is kept, content-addressed, so a
host can profile the same file again without sending it. Before an upload is received, `reserve`
makes room: it evicts the least recently used files that no queued or running job names and that no
host touched in the last `RECENT_S` seconds (a host between its uploads and its submit), until the
store fits `max_bytes` and the disk keeps `min_free_bytes` free. When it cannot, the upload is
refused (507) before a byte is written. A host re-uploads an evicted file when it needs it again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from . import protocol as P

RECENT_S = 900.0  # a file uploaded, checked for or run this recently is never evicted
MiB, GiB = 1 << 20, 1 << 30


class ArtifactStore:
    def __init__(self, root: Path, max_bytes: int, min_free_bytes: int, in_use: Callable[[], set[str]]):
        self.root = Path(root)
        self.max_bytes, self.min_free_bytes = max_bytes, min_free_bytes
        self._in_use = in_use  # sha256s that queued or running jobs name
        self._lock = threading.Lock()
        self._reserved = 0  # bytes of uploads in flight
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob(".upload-*"):
            tmp.unlink(missing_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha

    def touch(self, sha: str) -> None:
        """Mark a stored file as used now (a host checked for it, a job linked it)."""
        with contextlib.suppress(OSError):
            os.utime(self.path(sha))

    def _stored(self) -> list[tuple[float, int, Path]]:
        out = []
        for p in self.root.iterdir():
            if not p.name.startswith("."):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    @contextlib.contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        """Room for an upload of `size` bytes for as long as the block runs; P.ProtocolError 507 if there is none."""
        with self._lock:
            self._make_room(size)
            self._reserved += size
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= size

    def _make_room(self, size: int) -> None:
        stored = self._stored()
        total = sum(s for _, s, _ in stored) + self._reserved
        free = shutil.disk_usage(self.root).free - self._reserved
        keep, now = self._in_use(), time.time()
        evictable = [(s, p) for mtime, s, p in stored if p.name not in keep and now - mtime > RECENT_S]
        while (total + size > self.max_bytes or free - size < self.min_free_bytes) and evictable:
            s, p = evictable.pop(0)
            p.unlink(missing_ok=True)
            total, free = total - s, free + s
        if total + size > self.max_bytes:
            raise P.ProtocolError(
                f"the agent's artifact store is full: {total / GiB:.2f} GiB held by queued, running or recent jobs, "
                f"{size / GiB:.2f} GiB more would pass its cap of {self.max_bytes / GiB:.2f} GiB (agent --max-store-gb); "
                "retry once those jobs are done", 507)
        if free - size < self.min_free_bytes:
            raise P.ProtocolError(
                f"the board's disk has {max(free, 0) / MiB:.1f} MB free: a {size / MiB:.1f} MB upload would leave less "
                f"than the {self.min_free_bytes / MiB:.0f} MB the agent keeps free (agent --min-free-mb)", 507)
