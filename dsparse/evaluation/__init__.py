"""Evaluation: the metric loop (``loop``; the trainer's validation calls it too), a
checkpoint or export scored on a split (``checkpoint``, behind ``dsparse eval``), the dense
baseline of ``Delta_T`` (``baselines``) and the best constant predictor every model must
beat (``constant``).
"""

from dsparse.evaluation.baselines import check_comparable, load_baseline
from dsparse.evaluation.checkpoint import evaluate_checkpoint
from dsparse.evaluation.constant import constant_predictor_metrics, fit_constant_predictor
from dsparse.evaluation.loop import evaluate, format_metrics_table

__all__ = ["check_comparable", "constant_predictor_metrics", "evaluate", "evaluate_checkpoint",
           "fit_constant_predictor", "format_metrics_table", "load_baseline"]
