"""Evaluation: language-modelling loss and bits per byte, multiple-choice tasks, and `evaluate` over a run.

>>> from slmkit.eval import evaluate
>>> metrics = evaluate("runs/shk-small", lm=["shakespeare:val", "shakespeare:folio"], tasks=["mmlu"], limit=10)
"""

from slmkit.eval.evaluate import evaluate, metrics_table
from slmkit.eval.mc import load_task, run_task
from slmkit.metrics import bits_per_byte, lm_loss

__all__ = ["bits_per_byte", "evaluate", "lm_loss", "load_task", "metrics_table", "run_task"]
