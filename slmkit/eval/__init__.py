"""Evaluation: language-modelling loss and bits per byte."""

from slmkit.eval.lm import bits_per_byte, lm_loss

__all__ = ["bits_per_byte", "lm_loss"]
