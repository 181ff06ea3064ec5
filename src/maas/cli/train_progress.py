"""The progress bar of ``maas train``: step, loss, samples/s, learning rate, the last evaluation, time left.

Training runs in worker processes; ``maas train`` hands the workers this class by its import path
(:data:`RICH_PROGRESS`), and the worker that reports builds it and draws the bar on the terminal it shares
with the command. It fills :class:`maas.training.loop.Progress` by shape, so nothing here imports training
(or torch).
"""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

#: What ``maas train`` passes as ``train(..., progress=...)``.
RICH_PROGRESS = "maas.cli.train_progress:RichProgress"


class RichProgress:
    """A Rich progress bar over the run's steps, started when training starts."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task = TaskID(0)

    def start(self, total: int, completed: int) -> None:
        self._bar = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[sps]:,.0f} samples/s  lr {task.fields[lr]:.2e}"),
            TextColumn("{task.fields[eval]}"),
            TimeRemainingColumn(),
            refresh_per_second=4,  # each redraw holds the GIL for a moment the training step waits on
        )
        self._task = self._bar.add_task(
            "train", total=total, completed=completed, loss=float("nan"), sps=0.0, lr=0.0, eval=""
        )
        self._bar.start()

    def step(self, step: int, loss: float, samples_per_s: float, lr: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, sps=samples_per_s, lr=lr)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self._bar.update(self._task, eval=f"eval@{step}: {shown}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
