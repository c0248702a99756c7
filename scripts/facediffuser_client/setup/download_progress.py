"""A download's progress as the set-up shows it, and the file wrapper that reports each chunk written."""

from __future__ import annotations

import sys
import time

from ..progress import PLAIN_LINES, StatusLine, time_left, timing_text

UNSIZED_LINE_BYTES = 10**8  # piped, a download of unknown size prints a line each 100 MB


class DownloadProgress:
    """A download's progress: what arrived of how much, the speed, the time elapsed and about how long the rest takes;
    one line redrawn in place on a terminal, a line each tenth of the file (each 100 MB of one of unknown size) where
    the output is piped or logged.
    The set-up's own, not huggingface_hub's bar, which a terminal that reports no width shows empty."""

    def __init__(self, label: str, total: int | None, start: int, stream=None, clock=time.monotonic):
        self.label, self.total, self.start = label, total, start
        self.stream = stream or sys.stdout
        self.line = StatusLine(self.stream)
        self.clock = clock
        self.began = clock()
        self.tenth_shown = -1
        self.unshown = ""  # piped: the last state, when it had no line of its own

    def show(self, have: int) -> None:
        elapsed = self.clock() - self.began
        arrived = have - self.start
        speed = f", {arrived / elapsed / 1e6:.1f} MB/s" if elapsed > 0 and arrived > 0 else ""
        if self.total:
            left = time_left(elapsed, arrived, self.total - have) if have < self.total else None
            text = (f"  {self.label}: {have / 1e6:.1f} of {self.total / 1e6:.1f} MB ({100 * have // self.total}%){speed}, "
                    f"{timing_text(elapsed, left)}")
            tenth = PLAIN_LINES * have // self.total
        else:
            text, tenth = f"  {self.label}: {have / 1e6:.1f} MB{speed}, {timing_text(elapsed, None)}", have // UNSIZED_LINE_BYTES
        self.unshown = ""
        if self.line.terminal:
            self.line.draw(text)
        elif tenth != self.tenth_shown:
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            self.unshown = text
        self.tenth_shown = tenth

    def end(self) -> None:
        """The last state on its line: a download ends on what arrived, however it ends."""
        if self.unshown:
            self.stream.write(self.unshown + "\n")
            self.stream.flush()
            self.unshown = ""
        self.line.end()


class ReportingFile:
    """The partial file as http_get writes it, showing the progress after each chunk. The file's position, not a
    count of chunks, is what arrived: http_get truncates and starts over when a server ignores the Range asked for."""

    def __init__(self, file, progress: DownloadProgress):
        self.file, self.progress = file, progress

    def write(self, data: bytes) -> int:
        written = self.file.write(data)
        self.progress.show(self.file.tell())
        return written

    def __getattr__(self, name: str):
        return getattr(self.file, name)
