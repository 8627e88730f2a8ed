"""Periodic progress lines with rate and ETA (log-friendly: no carriage returns)."""

from __future__ import annotations

import time

from dsparse.progress import format_duration

__all__ = ["Progress", "format_duration"]


class Progress:
    """Tracks steps and samples since start to print ``step | losses | rate | ETA``."""

    def __init__(self, start_step: int, total_steps: int, samples_per_step: int):
        self.start_step = start_step
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.start_time = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def samples_per_second(self, step: int) -> float:
        elapsed = self.elapsed()
        return (step - self.start_step) * self.samples_per_step / elapsed if elapsed > 0 else 0.0

    def line(self, step: int, losses: dict[str, float], lr: float, data_wait: float) -> str:
        done = step - self.start_step
        eta = self.elapsed() / done * (self.total_steps - step) if done else 0.0
        per_task = " ".join(f"{name} {value:.4f}" for name, value in losses.items())
        return (f"step {step}/{self.total_steps} | loss {per_task} | {self.samples_per_second(step):.1f} samples/s"
                f" | data wait {100 * data_wait:.0f}% | lr {lr:.2e} | eta {format_duration(eta)}")
