"""Progress of a training run while it runs: a log line with the ETA, and per-step metrics to MLflow.

Rank 0 reports. Metrics (loss, learning rate, gradient norm, tokens/s) are buffered and sent to the
run's MLflow tracking run in one batch every few seconds, so a person watching the MLflow UI sees the
curves grow during training, not only at the end. A tracking server that cannot be reached costs a
warning, never the training run.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

log = logging.getLogger("nightshift.trainer")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class ProgressReporter:
    """Log progress with an ETA and stream per-step metrics to an MLflow run."""

    def __init__(self, total_steps: int, tokens_per_step: int, tracking: dict[str, str] | None = None,
                 first_step: int = 1, log_every_s: float = 10.0, flush_every_s: float = 5.0,
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.tokens_per_step = tokens_per_step
        self.first_step = first_step
        self.started = time.monotonic()
        self.last_log = -math.inf
        self.log_every_s = log_every_s
        self.flush_every_s = flush_every_s
        self.last_flush = time.monotonic()
        self.last_step_at = self.started
        self.buffer: list[Any] = []
        self._sender: Any = None
        self._pending: list[Any] = []
        self.client = None
        self.run_id = None
        if tracking and tracking.get("uri") and tracking.get("run_id"):
            try:
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(tracking_uri=tracking["uri"])
                self.run_id = tracking["run_id"]
            except Exception as exc:  # noqa: BLE001 - tracking is a convenience, training goes on
                log.warning("progress will not reach MLflow: %s", type(exc).__name__)

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None) -> dict[str, Any]:
        """Record one optimizer step; return the step's entry for the run's history."""
        now = time.monotonic()
        step_seconds = now - self.last_step_at
        self.last_step_at = now
        tokens_per_s = self.tokens_per_step / step_seconds if step_seconds > 0 else float("nan")
        entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        if self.client is not None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            for key, value in (("train_loss", loss), ("learning_rate", lr), ("grad_norm", grad_norm),
                               ("tokens_per_s", tokens_per_s)):
                if value is not None and math.isfinite(value):
                    self.buffer.append(Metric(key=key, value=float(value), timestamp=stamp, step=step))
            if now - self.last_flush >= self.flush_every_s or step == self.total:
                self.flush(wait=step == self.total)
        done = step - self.first_step + 1
        if self.enabled and (step in (self.first_step, self.total) or now - self.last_log >= self.log_every_s):
            self.last_log = now
            elapsed = now - self.started
            eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
            norm = f" grad-norm {grad_norm:.3f}" if grad_norm is not None and math.isfinite(grad_norm) else ""
            log.info("step %d/%d loss %.4f lr %.2e%s %.0f tokens/s elapsed %s eta %s", step, self.total, loss, lr,
                     norm, done * self.tokens_per_step / max(elapsed, 1e-9), format_duration(elapsed),
                     format_duration(eta))
        return entry

    def flush(self, wait: bool = False) -> None:
        """Send the buffered metrics from a background thread (a slow server never stalls the ranks)."""
        if self.client is not None and self.buffer:
            batch, self.buffer = self.buffer, []
            self.last_flush = time.monotonic()
            if self._sender is None:
                from concurrent.futures import ThreadPoolExecutor

                self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
            self._pending.append(self._sender.submit(self._send, batch))
        if wait:
            for future in self._pending:
                try:
                    future.result(timeout=60)
                except Exception:  # noqa: BLE001 - a timeout: the run goes on without the rest of its curve
                    log.warning("progress metrics still unsent after 60 s; giving up on them")
                    break
            self._pending = []

    def _send(self, batch: list[Any]) -> None:
        if self.client is None:
            return
        try:
            for start in range(0, len(batch), 900):  # MLflow takes at most 1,000 metrics per batch
                self.client.log_batch(self.run_id, metrics=batch[start:start + 900])
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            log.warning("could not send progress to MLflow (%s); training goes on", type(exc).__name__)
            self.client = None
