"""`sbora train`'s view of a run: a progress bar, eval and checkpoint lines, and a clean Ctrl-C.

Imported only by `sbora train`, so the other commands start without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import Progress

from sbora_core.training.train import Callbacks
from sbora_core.training.train import Progress as TrainingProgress


class ConsoleCallbacks(Callbacks):
    """Training callbacks that draw a progress bar and stop cleanly on Ctrl-C."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.console = bar.console  # the command's console: messages print above the bar
        self.task = bar.add_task("training", total=None, loss="-", tps="-")
        self.cancelled = False

    def interrupt(self, *_: Any) -> None:
        if self.cancelled:
            raise KeyboardInterrupt
        self.cancelled = True
        self.console.print("[yellow]stopping after this step (Ctrl-C again to abort without a checkpoint)[/yellow]")

    def on_progress(self, p: TrainingProgress) -> None:
        self.bar.update(self.task, completed=p.step, total=p.total_steps, loss=f"{p.loss:.4f}",
                        tps=f"{p.tokens_per_s:,.0f}")

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.console.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any] | None = None) -> None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items() if k != "step" and isinstance(v, float))
        self.console.print(f"[dim]checkpoint {path}{': ' + shown if shown else ''}[/dim]")

    def on_log(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/dim]")

    def should_cancel(self) -> bool:
        return self.cancelled
