"""Task weights of the joint loss: fixed (``task_weights``) or adaptive (AdapMTL's rule).

``train.loss_weighting: adaptive`` follows AdapMTL (ACM MM 2024): a task whose loss still
changes fast relative to its size gets more weight. With ``r_k(t) = |L_k(t-1) - L_k(t)| /
L_k(t)`` for task ``k`` at step ``t``, from step ``train.adaptive_start`` on the weight of
task ``k`` in step ``t`` is the mean of ``r_k`` over the ``train.adaptive_window`` steps
before ``t``, renormalised so the T weights sum to T; before it, and while no task's loss
has moved, the fixed weights apply. The losses are the means over ranks (every rank
all-reduces them each step anyway, for the NaN check), so all ranks weigh alike. The
window is part of every checkpoint, so a resumed run weighs its next step exactly as an
uninterrupted one would.
"""

from __future__ import annotations

from collections import deque

__all__ = ["AdaptiveLossWeights", "FixedLossWeights", "build_loss_weights"]


class FixedLossWeights:
    """The config's ``task_weights`` (1 for a task not listed), every step."""

    def __init__(self, weights: dict[str, float]):
        self._weights = dict(weights)

    def weights(self, step: int) -> dict[str, float]:
        """The weights of the step ``step`` (1-based), before its forward."""
        return dict(self._weights)

    def observe(self, step: int, losses: dict[str, float]) -> None:
        """The rank-mean task losses of step ``step``, after its forward."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            raise ValueError("the checkpoint holds adaptive loss-weighting state but the config has "
                             "train.loss_weighting: fixed; resume with the settings the run was started with")


class AdaptiveLossWeights(FixedLossWeights):
    """AdapMTL's window of relative loss changes (module docstring)."""

    def __init__(self, weights: dict[str, float], start: int, window: int):
        super().__init__(weights)
        self.start, self.window = start, window
        self.previous: dict[str, float] | None = None
        self.changes: dict[str, deque] = {task: deque(maxlen=window) for task in weights}

    def weights(self, step: int) -> dict[str, float]:
        if step < self.start or not all(self.changes.values()):
            return dict(self._weights)
        means = {task: sum(values) / len(values) for task, values in self.changes.items()}
        total = sum(means.values())
        if not total > 0:  # no loss has moved (or every change is 0): nothing to adapt to
            return dict(self._weights)
        return {task: len(means) * value / total for task, value in means.items()}

    def observe(self, step: int, losses: dict[str, float]) -> None:
        if self.previous is not None:
            for task, loss in losses.items():
                self.changes[task].append(abs(self.previous[task] - loss) / max(abs(loss), 1e-12))
        self.previous = dict(losses)

    def state_dict(self) -> dict:
        return {"rule": "adaptive", "start": self.start, "window": self.window, "previous": self.previous,
                "changes": {task: list(values) for task, values in self.changes.items()}}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            raise ValueError("the checkpoint has no adaptive loss-weighting state (it was trained with "
                             "train.loss_weighting: fixed); resume with the settings the run was started with")
        if sorted(state["changes"]) != sorted(self.changes):
            raise ValueError(f"the checkpoint's loss weighting covers tasks {sorted(state['changes'])}, the run "
                             f"has {sorted(self.changes)}")
        self.previous = state["previous"]
        for task, values in state["changes"].items():
            self.changes[task] = deque(values[-self.window:], maxlen=self.window)


def build_loss_weights(config) -> FixedLossWeights:
    """The loss weighting of a run config (``train.loss_weighting``)."""
    fixed = {task: config.weight_of(task) for task in config.tasks}
    train = config.train
    if train.loss_weighting == "adaptive":
        return AdaptiveLossWeights(fixed, train.adaptive_start, train.adaptive_window)
    return FixedLossWeights(fixed)
