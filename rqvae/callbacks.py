"""Training callbacks. The loop knows no logging backend: jobs plug MLflow, bars, etc. in here."""
from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO


class Callback(Protocol):
    """Hooks called by :func:`rqvae.train.fit`; every method is optional in practice."""

    def on_train_begin(self, info: dict[str, Any]) -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, summary: dict[str, Any]) -> None: ...


class ProgressPrinter:
    """A one-line progress bar on a terminal; a line every ``every`` epochs otherwise (logs)."""

    def __init__(self, stream: TextIO | None = None, every: int = 10, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.every, self.width = every, width
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.start = 0, 0.0

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.total, self.start = int(info.get("epochs", 0)), time.perf_counter()
        if self.total == 0:
            self.stream.write(f"fitted on {info.get('device')}: {info.get('train_items')} items, every level "
                              "input-space k-means, no epochs to run\n")
            return
        self.stream.write(f"training on {info.get('device')}: {info.get('train_items')} items, "
                          f"{info.get('holdout_items')} held out, up to {self.total} epochs\n")

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.total == 0:  # a fully anchored model: its one evaluation, no epoch
            return
        done = epoch + 1
        text = (f"epoch {done}/{self.total} loss {metrics.get('train_loss', float('nan')):.4f} "
                f"val {metrics.get('val_loss', float('nan')):.4f} {time.perf_counter() - self.start:.0f}s")
        if self.interactive:
            filled = int(self.width * done / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {text}")
        elif done % self.every == 0 or done == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self.total == 0:
            return
        if self.interactive:
            self.stream.write("\n")
        self.stream.write(f"training done: best epoch {summary.get('best_epoch')} "
                          f"in {time.perf_counter() - self.start:.1f}s\n")
        self.stream.flush()


def call(callbacks: list[Any], hook: str, *args: Any) -> None:
    """Call ``hook`` on every callback that defines it."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)
