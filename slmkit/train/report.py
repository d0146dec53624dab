"""Loss-curve plot of a run's metrics."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def plot_metrics(records: list[dict[str, Any]], path: Path, *, bytes_per_token: float) -> None:
    """Train loss and val loss (nats/token) against tokens seen; val bits-per-byte on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers/CI; import here so `import slmkit` stays light
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", alpha=0.7, lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", color="tab:orange", ms=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    sec = ax.secondary_yaxis("right", functions=(lambda x: x / math.log(2) / bytes_per_token,
                                                 lambda b: b * math.log(2) * bytes_per_token))
    sec.set_ylabel("bits per byte")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader never sees a half-drawn plot
