"""The one progress-bar factory every command uses: a live bar on a terminal, log lines elsewhere.

tqdm redraws its bar with carriage returns. On a terminal that is a bar; in a log file (a Snakemake rule's
log, a SLURM job's output) it is one line of hundreds of updates glued together, unreadable and huge. So
when the stream is not a TTY, `progress_bar` returns a bar that prints an ordinary line only when the work
has advanced by `LOG_PERCENT` per cent or `LOG_SECONDS` seconds have passed since the last line (and once at
the end), never a carriage return. The line is tqdm's own meter, so it reads the same as the bar.
"""

from __future__ import annotations

import io
import sys
import time

from tqdm import tqdm

LOG_PERCENT = 5.0
LOG_SECONDS = 30.0


class _Sink(io.StringIO):
    """Where tqdm's own carriage-return output goes in log mode: nowhere."""

    def write(self, s: str) -> int:
        return len(s)


class LogLines(tqdm):
    """A tqdm whose display is one plain line every LOG_PERCENT per cent or LOG_SECONDS seconds."""

    def __init__(self, *args, file=None, **kwargs) -> None:
        self._out = file if file is not None else sys.stderr
        self._last_pct = -LOG_PERCENT
        self._last_t = 0.0
        self._last_n = -1
        kwargs.setdefault("mininterval", 1.0)
        super().__init__(*args, file=_Sink(), **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.disable:
            return False
        now = time.monotonic()
        final = getattr(self, "_closing", False)
        pct = 100.0 * self.n / self.total if self.total else None
        due = (pct is not None and pct >= self._last_pct + LOG_PERCENT) or now - self._last_t >= LOG_SECONDS
        if (final and self.n != self._last_n) or (due and self.n != self._last_n):
            self._out.write(self.format_meter(**self.format_dict).strip() + "\n")
            self._out.flush()
            if pct is not None:
                self._last_pct = pct - pct % LOG_PERCENT
            self._last_t, self._last_n = now, self.n
        return True

    def close(self) -> None:
        if not self.disable and not getattr(self, "_closing", False):
            self._closing = True
            self.display()
        super().close()


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(*args, file=None, **kwargs) -> tqdm:
    """A tqdm on `file` (default stderr): a live bar on a terminal, `LogLines` otherwise. Takes tqdm's
    arguments."""
    stream = file if file is not None else sys.stderr
    if _is_tty(stream):
        return tqdm(*args, file=stream, **kwargs)
    return LogLines(*args, file=stream, **kwargs)
