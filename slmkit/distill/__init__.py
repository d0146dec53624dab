"""Knowledge distillation: a small student trained on a large teacher's next-token distributions, read from a top-k
cache of the teacher computed once (`slm distill`).

>>> from slmkit.distill import DistillConfig, distill
>>> from slmkit.config import TrainConfig
>>> distill("runs/smollm2", "llama-3m", "runs/data/shk-smol", "runs/d3m", DistillConfig(loss="fkl", temperature=2.0),
...         TrainConfig(max_time="10m"))  # doctest: +SKIP
"""

from slmkit.distill.cache import CacheSpec, TeacherCache, open_cache
from slmkit.distill.losses import distill_loss, topk_kl
from slmkit.distill.stage import DistillConfig, DistillResult, distill

__all__ = [
    "CacheSpec",
    "DistillConfig",
    "DistillResult",
    "TeacherCache",
    "distill",
    "distill_loss",
    "open_cache",
    "topk_kl",
]
