"""Compression transforms: functions that take a model and return it rewritten (quantize, prune, factorize).

>>> from slmkit.compress import factorize_model, prune_model, quantize
>>> model = quantize(model, "int8")   # weight-only int8: 4x fewer bytes per decoded token
>>> model = quantize(model, "int4", method="gptq", calib=calib_ids)   # calibrated 4-bit, the same storage as RTN
>>> model = prune_model(model, "wanda", 0.5, calib=calib_ids)   # half of each row's weights zero
>>> smaller = prune_model(model, "channels", 0.3, calib=calib_ids)   # a smaller dense model
>>> low = factorize_model(model, rank=64)   # truncated SVD into low-rank layers
"""

from slmkit.compress.awq import awq
from slmkit.compress.factorize import factorize_model
from slmkit.compress.gptq import gptq
from slmkit.compress.prune import prune_model
from slmkit.compress.quantize import quantize
from slmkit.infer.quantized import QuantExperts, QuantLinear

__all__ = ["QuantExperts", "QuantLinear", "awq", "factorize_model", "gptq", "prune_model", "quantize"]
