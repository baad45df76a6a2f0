"""Live progress of a run, read from metrics.jsonl: a rich progress bar on a terminal, one plain line per
learner step otherwise (CI logs, files).

On a terminal of any width the line starts with what a user looks for first, step M/N, version and reward;
the bar, the clock and the other metrics take what room is left (the tail is cut with an ellipsis, never
the head). A resumed run shows only the steps it trains: the rows already in metrics.jsonl are not replayed,
the bar starts where the run resumes.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Column


def _num(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def headline(row: dict) -> str:
    """Version and reward: the part of a progress line that must always show."""
    return f"v{row.get('version', '-')} reward {_num(row, 'reward/mean')}"


def details(row: dict) -> str:
    """The rest of a progress line: staleness, TIS weight, throughput, buffer fill."""
    return (f"staleness max {_num(row, 'staleness/max', '{:.0f}')} mean {_num(row, 'staleness/mean')}"
            f" tis {_num(row, 'tis/weight_mean')} train {_num(row, 'perf/train_tokens_per_s', '{:.0f}')}"
            f" tok/s gen {_num(row, 'perf/gen_tokens_per_s', '{:.0f}')} tok/s buffer {_num(row, 'buffer/size', '{:.0f}')}")


def describe(row: dict) -> str:
    return f"{headline(row)} {details(row)}"


class Progress:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool = True, resume: bool = False,
                 console: Console | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total_steps
        self.enabled = enabled
        self.console = console or Console()
        self._offset = 0
        self._done = 0  # steps finished before this launch (a resumed run's bar starts there)
        if resume and self.path.exists():  # rows of the steps before the resume are history, not progress
            rows = self._new_rows()
            self._done = rows[-1]["step"] + 1 if rows else 0
        self._bar = None
        self._task = None

    def start(self) -> None:
        if not self.enabled or not self.console.is_terminal:
            return
        # the first column never wraps or shrinks; the details column gives way first, then the bar
        self._bar = RichProgress(
            TextColumn("[bold]step {task.completed:.0f}/{task.total:.0f}[/] {task.fields[head]}",
                       table_column=Column(no_wrap=True)),
            BarColumn(bar_width=20), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=self.console, expand=True)
        info = "waiting for the first batch" + (f" (resumed at step {self._done})" if self._done else "")
        self._task = self._bar.add_task("train", total=self.total, completed=self._done, head="", info=info)
        self._bar.start()

    def _new_rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def refresh(self) -> None:
        if not self.enabled:
            return
        for row in self._new_rows():
            if self._bar is not None:
                self._bar.update(self._task, completed=row["step"] + 1, head=headline(row), info=details(row))
            else:
                print(f"step {row['step'] + 1}/{self.total} {describe(row)}", flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self.refresh()
            self._bar.stop()
            self._bar = None
