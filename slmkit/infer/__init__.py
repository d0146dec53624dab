"""Inference engine: token ids in, token ids out."""

from slmkit.infer.engine import generate
from slmkit.sampling import SamplingParams, sample_next

__all__ = ["SamplingParams", "generate", "sample_next"]
