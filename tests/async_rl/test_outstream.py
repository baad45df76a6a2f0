"""The launcher's stdout wrapper (async_rl/launch/outstream.py) on a real pipe: writing never blocks when nobody
reads, what could not be queued is counted and reported, and a reader that keeps up gets every line in
order."""
from __future__ import annotations

import os
import threading

from async_rl.launch.outstream import Unblocked


def _pipe():
    r, w = os.pipe()
    return os.fdopen(r, "r"), os.fdopen(w, "w")


def _write_lines(out: Unblocked, n: int) -> threading.Thread:
    t = threading.Thread(target=lambda: [print(f"line {i:06d} " + "x" * 90, file=out) for i in range(n)],
                         daemon=True)
    t.start()
    return t


def test_a_pipe_nobody_reads_never_blocks_the_writer_and_drops_are_reported():
    reader, writer = _pipe()
    filled = 0
    os.set_blocking(writer.fileno(), False)
    try:  # the pipe is full before the first line: nobody reads it
        while True:
            filled += os.write(writer.fileno(), b"#" * 4096)
    except BlockingIOError:
        os.set_blocking(writer.fileno(), True)
    out = Unblocked(writer, max_lines=200)
    t = _write_lines(out, 5000)
    t.join(timeout=60)
    assert not t.is_alive(), "print() blocked on a full pipe"
    assert out.dropped > 0
    got: list[str] = []
    drain = threading.Thread(target=lambda: got.extend(reader), daemon=True)
    drain.start()  # the reader comes back
    assert out.drain(timeout=30)
    writer.close()
    drain.join(timeout=30)
    got = "".join(got)[filled:].splitlines(keepends=True)
    lines = [ln for ln in got if ln.startswith("line ")]
    numbers = [int(ln.split()[1]) for ln in lines]
    assert numbers == sorted(numbers) and numbers[0] == 0  # what was written came in order, from the start
    notice = [ln for ln in got if "dropped" in ln]
    assert len(notice) == 1 and int(notice[0].split()[1]) == 5000 - len(lines)


def test_a_reader_that_keeps_up_gets_every_line_in_order():
    reader, writer = _pipe()
    out = Unblocked(writer)
    got: list[str] = []
    drain = threading.Thread(target=lambda: got.extend(reader), daemon=True)
    drain.start()
    t = _write_lines(out, 3000)
    t.join(timeout=60)
    assert not t.is_alive()
    assert out.drain(timeout=30)
    writer.close()
    drain.join(timeout=30)
    assert out.dropped == 0 and [int(ln.split()[1]) for ln in got] == list(range(3000))
