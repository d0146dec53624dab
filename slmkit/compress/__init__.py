"""Compression transforms: functions that take a model and return it rewritten (quantize; prune/distill to come).

>>> from slmkit.compress import quantize
>>> model = quantize(model, "int8")   # weight-only int8: 4x fewer bytes per decoded token
>>> model = quantize(model, "int4", method="gptq", calib=calib_ids)   # calibrated 4-bit, the same storage as RTN
"""

from slmkit.compress.awq import awq
from slmkit.compress.gptq import gptq
from slmkit.compress.quantize import quantize
from slmkit.infer.quantized import QuantExperts, QuantLinear

__all__ = ["QuantExperts", "QuantLinear", "awq", "gptq", "quantize"]
