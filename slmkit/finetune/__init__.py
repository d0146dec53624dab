"""Fine-tuning: adapt a trained or imported model to a domain (continued pretraining), a classification task or
chat, with full fine-tuning, LoRA or a frozen body — a run in, a run out (`slm finetune`, `slm classify`).

>>> from slmkit.finetune import FinetuneConfig, default_train_config, finetune, Classifier
>>> finetune("runs/smollm2", "bbc-news", "runs/bbc-clf", FinetuneConfig(task="classify", method="lora"),
...          default_train_config("lora", max_steps=300))  # doctest: +SKIP
>>> Classifier.load("runs/bbc-clf").predict(["Shares fell sharply in early trading."])[0].label  # doctest: +SKIP
'business'
"""

from slmkit.finetune.config import FinetuneConfig, default_train_config
from slmkit.finetune.data import load_labelled, render_chat
from slmkit.finetune.loop import FinetuneResult, finetune
from slmkit.finetune.lora import LoRALinear, add_lora, merge_lora
from slmkit.finetune.model import Classifier, Prediction, load_finetuned

__all__ = [
    "Classifier",
    "FinetuneConfig",
    "FinetuneResult",
    "LoRALinear",
    "Prediction",
    "add_lora",
    "default_train_config",
    "finetune",
    "load_finetuned",
    "load_labelled",
    "merge_lora",
    "render_chat",
]
