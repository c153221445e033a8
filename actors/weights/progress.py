"""Weight-loading progress: a tqdm bar in this process, and, when MOGE_PROGRESS_FILE names a file,
the same counts appended there as JSON lines, so the process that started this one (the `moge serve`
terminal, whose Ray replicas and workers write only into their own log files) can draw the bars.

One line per update, at most every MIN_INTERVAL_S and always at the end:
{"pid": 123, "desc": "expert groups", "n": 12, "total": 48}. Lines are short and written with
O_APPEND, so several processes can share one file.
"""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm

PROGRESS_FILE_ENV = "MOGE_PROGRESS_FILE"
MIN_INTERVAL_S = 0.25
SHOW_AFTER_S = 2.0  # the local bar only for loads slow enough to wonder about


class LoadProgress:
    def __init__(self, total: int, desc: str, clock=time.monotonic) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self._clock = clock
        self._path = os.environ.get(PROGRESS_FILE_ENV) or None
        self._last = float("-inf")
        # with a sink the terminal draws the bar; this process's stderr is a log file then
        self._bar = None if self._path else tqdm(total=total, desc=desc, unit="tensor", delay=SHOW_AFTER_S, leave=False)
        self._emit(force=True)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        self._emit(force=self.n >= self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._emit(force=True)

    def _emit(self, force: bool) -> None:
        if self._path is None:
            return
        now = self._clock()
        if not force and now - self._last < MIN_INTERVAL_S:
            return
        self._last = now
        line = json.dumps({"pid": os.getpid(), "desc": self.desc, "n": self.n, "total": self.total}) + "\n"
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError:  # the terminal's file is gone (it stopped watching): progress is optional
            self._path = None

    def __enter__(self) -> "LoadProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
