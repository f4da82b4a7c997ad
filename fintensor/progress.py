"""What a training run shows and logs (rank 0 only): a progress bar with one line per epoch, metrics.csv,
and TensorBoard scalars when tensorboard is installed."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .fileio import atomic_write_bytes

METRICS_CSV = "metrics.csv"
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "valid_loss", "valid_ic", "valid_rank_ic", "seconds",
                   "samples_per_s")


class Progress:
    """Rank 0's view of a run. ``out=None``: no files; ``enabled=False``: nothing on the terminal."""

    def __init__(self, out: Path | None, enabled: bool):
        self.out = out
        self.bar: Any = None
        self.writer: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=True)
            self.bar.start()
        if out is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the CSV is the log
                pass
            else:
                self.writer = SummaryWriter(str(out / "tensorboard"))

    def say(self, line: str) -> None:
        """One line above the bar (the run's setting, e.g. which device it trains on)."""
        if self.bar is not None:
            self.bar.console.print(line, highlight=False)

    def task(self, description: str, total: int):
        return self.bar.add_task(description, total=total, info="") if self.bar else None

    def advance(self, task, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(task, advance=1, info=info)

    def epoch_done(self, task, row: dict, history: list[dict]) -> None:
        if self.bar is not None:
            self.bar.remove_task(task)
            self.bar.console.print(epoch_line(row), highlight=False)
        if self.out is not None:
            write_csv(self.out / METRICS_CSV, history)
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and v is not None:
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()


def epoch_line(row: dict) -> str:
    """One short line per epoch: losses (train, valid), valid IC and Rank IC, lr, time."""
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}"]
    if "valid_ic" in row:
        parts += [f"valid {row['valid_loss']:.4f}", f"ic {row['valid_ic']:+.4f}", f"rank_ic {row['valid_rank_ic']:+.4f}"]
    return "  ".join(parts + [f"lr {row['lr']:.3g}", f"{row['seconds']:.1f}s"])


def write_csv(path: Path, history: list[dict]) -> None:
    """The whole history as metrics.csv, replaced atomically after each epoch."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())
