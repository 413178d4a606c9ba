"""Progress on stderr: tqdm's bar on a terminal, a plain line every few percent elsewhere.

A bar redraws itself with carriage returns many times a second; written to a log file or a
pipe, that is thousands of lines of noise (160 KB for one ``make quick``). Off a terminal,
:class:`LineProgress` prints one line each time another ``step`` percent is done, and the last.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class LineProgress:
    """The part of tqdm's interface distrep uses, printing plain lines."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", step: float = 5.0, file=None):
        self.total, self.desc, self.unit, self.step = max(int(total), 0), desc, unit, step
        self.file = file or sys.stderr
        self.n, self.postfix, self._next, self._start = 0, "", step, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        percent = 100.0 * self.n / self.total if self.total else 100.0
        if percent >= self._next or self.n >= self.total:
            self._print(percent)
            while self._next <= percent:
                self._next += self.step

    def _print(self, percent: float) -> None:
        elapsed = time.monotonic() - self._start
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 and self.n else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {percent:3.0f}% ({self.n} of {self.total} {self.unit}{rate}{extra})",
              file=self.file, flush=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str, enabled: bool = True):
    """A progress reporter for ``total`` units: tqdm on a terminal, :class:`LineProgress` off
    one, nothing when not ``enabled``."""
    if not enabled:
        return tqdm(total=total, disable=True)
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
    return LineProgress(total, desc, unit)
