"""Inference engine: token ids in, token ids out."""

from slmkit.infer.engine import SamplingParams, generate, sample_next

__all__ = ["SamplingParams", "generate", "sample_next"]
