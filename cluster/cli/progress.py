"""The terminal side of weight-loading progress: `moge serve` names a file in MOGE_PROGRESS_FILE
before Ray starts (so every replica and expert worker inherits it), the loaders append their counts
there (actors/weights/progress.py), and this draws one tqdm bar per (process, part) on the terminal.

Off when the stream is not a TTY (a log file or a pipe gets no bar lines); the file is removed at exit.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import IO

from actors.weights.progress import PROGRESS_FILE_ENV

POLL_S = 0.2


class LoadBars:
    def __init__(self, out: IO[str], poll_s: float = POLL_S) -> None:
        self.out = out
        self.poll_s = poll_s
        self.enabled = bool(getattr(out, "isatty", lambda: False)())
        self.path: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bars: dict[tuple[int, str], object] = {}
        self._offset = 0
        self._previous_env: str | None = None

    def __enter__(self) -> "LoadBars":
        if not self.enabled:
            return self
        fd, self.path = tempfile.mkstemp(prefix="moge-progress-", suffix=".jsonl")
        os.close(fd)
        self._previous_env = os.environ.get(PROGRESS_FILE_ENV)
        os.environ[PROGRESS_FILE_ENV] = self.path
        self._thread = threading.Thread(target=self._watch, name="load-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.poll()
        for bar in self._bars.values():
            bar.close()
        if self._previous_env is None:
            os.environ.pop(PROGRESS_FILE_ENV, None)
        else:
            os.environ[PROGRESS_FILE_ENV] = self._previous_env
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Read the lines added since the last poll and move the bars."""
        from tqdm import tqdm

        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self._offset += end
        for raw in data[:end].splitlines():
            try:
                rec = json.loads(raw)
                key, n, total = (int(rec["pid"]), str(rec["desc"])), int(rec["n"]), int(rec["total"])
            except (ValueError, KeyError, TypeError):
                continue
            bar = self._bars.get(key)
            if bar is None:
                bar = self._bars[key] = tqdm(total=total, desc=f"loading {key[1]}", unit="tensor", file=self.out,
                                             leave=True, dynamic_ncols=True)
            bar.update(n - bar.n)
            if n >= total:
                bar.refresh()
