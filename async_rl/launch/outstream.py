"""Launcher output that never blocks the launcher.

The launcher's main thread is also the supervisor: it restarts dead processes and acts on `async-rl stop`.
Printing to a pipe that nobody reads (a log shipper that stalled, `| less` left unscrolled, a parent that
reads only at the end) blocks in write() once the pipe's 64 kB are full, and with it all supervision.
`Unblocked` puts lines on a bounded queue that a writer thread empties; when the queue is full, new lines
are dropped and counted, and the count is written as soon as the reader catches up. Installed by
`async-rl launch` when stdout is not a terminal (a terminal is read by definition).
"""
from __future__ import annotations

import io
import queue
import threading


class Unblocked(io.TextIOBase):
    def __init__(self, stream, max_lines: int = 10000):
        self.stream = stream
        self.dropped = 0  # lines not written because the queue was full (reported, then reset)
        self._partial = ""  # the text after the last newline written
        self._count = threading.Lock()  # `dropped` is raised by writers and reset by the writer thread
        self._queue: queue.Queue = queue.Queue(max_lines)
        self._writer = threading.Thread(target=self._write_loop, name="stdout-writer", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        while True:
            text = self._queue.get()
            try:
                if text is not None:
                    self.stream.write(text)
                if self.dropped and (text is None or self._queue.empty()):  # caught up (or closing)
                    with self._count:
                        n, self.dropped = self.dropped, 0
                    self.stream.write(f"async-rl: {n} output line(s) dropped: stdout was not being read\n")
                self.stream.flush()
            except (OSError, ValueError):  # reader gone (EPIPE) or stream closed: nothing more to write
                return
            if text is None:
                return

    def write(self, text: str) -> int:
        """Queue whole lines (print() writes the text and its newline separately); never blocks."""
        if "\n" not in text:
            self._partial += text
            return len(text)
        head, _, self._partial = (self._partial + text).rpartition("\n")
        try:
            self._queue.put_nowait(head + "\n")
        except queue.Full:
            with self._count:
                self.dropped += head.count("\n") + 1
        return len(text)

    def flush(self) -> None:  # the writer thread flushes; flushing here could block
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def drain(self, timeout: float) -> bool:
        """Let the writer finish what is queued, waiting at most `timeout` s; True if everything was written."""
        try:
            if self._partial:
                self._queue.put(self._partial, timeout=timeout)
                self._partial = ""
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return False
        self._writer.join(timeout)
        return not self._writer.is_alive()
