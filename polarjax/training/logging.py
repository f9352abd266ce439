"""Metrics to the console, a JSONL file and TensorBoard event files; a progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    """Appends ``{"step", "split", "time", metrics...}`` lines to ``metrics.jsonl``.

    TensorBoard event files go to ``<run_dir>/tensorboard`` (tensorboardX) when enabled.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.handle = open(self.path, "a", buffering=1)
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, split: str, metrics: dict) -> None:
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update({k: v for k, v in metrics.items()})
        self.handle.write(json.dumps(record, default=float) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """A one-line progress bar with rate and ETA (writes to stderr; plain lines when not a TTY)."""

    def __init__(self, total: int, start: int = 0, stream=None, every_s: float = 1.0):
        self.total, self.start, self.stream = total, start, stream or sys.stderr
        self.t0 = time.time()
        self.last = 0.0
        self.every_s = every_s
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.loss = float("nan")

    def update(self, step: int, loss: float) -> None:
        self.loss = loss
        now = time.time()
        if now - self.last < (self.every_s if self.tty else 30.0) and step < self.total:
            return
        self.last = now
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * step / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4g} "
                f"{rate:.2f} it/s ETA {_fmt(eta)}")
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r")
        print(text, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
