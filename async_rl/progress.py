"""Live progress of a run, read from metrics.jsonl: a rich progress bar on a terminal, one plain line per
learner step otherwise (CI logs, files)."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


def describe(row: dict) -> str:
    def num(key, fmt="{:.2f}"):
        v = row.get(key)
        return "-" if v is None else fmt.format(v)
    return (f"v{row.get('version', '-')} reward {num('reward/mean')} staleness max {num('staleness/max', '{:.0f}')}"
            f" mean {num('staleness/mean')} tis {num('tis/weight_mean')} train {num('perf/train_tokens_per_s', '{:.0f}')}"
            f" tok/s gen {num('perf/gen_tokens_per_s', '{:.0f}')} tok/s buffer {num('buffer/size', '{:.0f}')}")


class Progress:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total_steps
        self.enabled = enabled
        self.console = Console()
        self._offset = 0
        self._bar = None
        self._task = None

    def start(self) -> None:
        if not self.enabled or not self.console.is_terminal:
            return
        self._bar = RichProgress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console)
        self._task = self._bar.add_task("train", total=self.total, info="waiting for the first batch")
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
                self._bar.update(self._task, completed=row["step"] + 1, info=describe(row))
            else:
                print(f"step {row['step'] + 1}/{self.total} {describe(row)}", flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self.refresh()
            self._bar.stop()
            self._bar = None
