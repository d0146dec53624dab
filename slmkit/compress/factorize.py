"""Low-rank factorisation of a trained model, and `slm factorize`: a run in, a factorised run out.

    slm factorize runs/shk --rank 64 --out runs/shk-r64
    slm factorize runs/shk --energy 0.9 --heal 5m --out runs/shk-e90

Each block projection W (out × in) — attention qkv and proj, MLP fc and proj: what `ModelConfig.lowrank` factorises
— becomes the truncated SVD W ≈ U_r Σ_r V_rᵀ, the best rank-r approximation in Frobenius norm (Eckart–Young), stored
in slmkit's own `LowRankLinear` as b · a with a = Σ_r^½ V_rᵀ (r × in) and b = U_r Σ_r^½ (out × r): the singular
values split evenly, so both factors have the same scale, which keeps healing (and later int8 rounding) well
conditioned. The bias stays on b.

ModelConfig has one `lowrank` for every projection, so the rank is uniform. `--energy E` picks the smallest rank
that keeps at least E of Σσ² in *every* layer (the largest of the per-layer ranks). A layer of rank r costs
r·(in + out) weights instead of in·out, so a rank above in·out / (in + out) makes it bigger: the stage reports the
parameter counts either way. The fused C decode step does not run low-rank layers yet, so a factorised model
decodes through PyTorch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor, nn

from slmkit import checkpoint, run
from slmkit.compress.heal import heal_and_compare, heal_data
from slmkit.compress.stage import load_parent, write_run
from slmkit.config import parse_duration
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.model.ffn import LowRankLinear


def factorize_linear(lin: nn.Linear, rank: int) -> LowRankLinear:
    """The rank-`rank` truncated SVD of `lin` as a LowRankLinear (b · a); at full rank (min(out, in)) it computes the
    same function up to rounding."""
    N, K = lin.weight.shape
    if not 1 <= rank <= min(N, K):
        raise SlmError(f"rank {rank} is outside 1..{min(N, K)} for a {N}×{K} layer")
    low = LowRankLinear(K, N, rank, bias=lin.bias is not None)
    a, b = _factors(lin.weight.detach(), rank)
    with torch.no_grad():
        low.a.weight.copy_(a)
        low.b.weight.copy_(b)
        if lin.bias is not None:
            low.b.bias.copy_(lin.bias)
    return low


def _factors(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(a (r, in), b (out, r)) with b · a the best rank-r approximation of w; SVD in fp64 so that a full-rank
    factorisation reproduces w to fp32 rounding."""
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = S[:rank].sqrt()
    return (root[:, None] * Vh[:rank]).float(), (U[:, :rank] * root).float()


def factorizable(model: GPT) -> dict[str, nn.Linear]:
    """The layers `ModelConfig.lowrank` factorises, by module name: found by building the factorised config's model
    on the meta device (no memory), so this follows model.py rather than a list of names kept here."""
    cfg = model.config
    if cfg.lowrank:
        raise SlmError(f"this model is already factorised (lowrank={cfg.lowrank}); factorize its parent instead")
    if cfg.moe_experts:
        raise SlmError("ModelConfig factorises dense projections only, and this is a Mixture-of-Experts model")
    with torch.device("meta"):
        shape = GPT(cfg.replace(lowrank=1))
    names = [n for n, m in shape.named_modules() if isinstance(m, LowRankLinear)]
    layers = {n: model.get_submodule(n) for n in names}
    odd = [n for n, m in layers.items() if type(m) is not nn.Linear]
    if odd:
        raise SlmError(f"{odd[0]} is not an fp32 nn.Linear (quantized?); factorize the fp32 parent")
    return layers


def spectra(model: GPT) -> dict[str, Tensor]:
    """σ² of every factorisable layer (descending), by module name."""
    return {n: torch.linalg.svdvals(lin.weight.detach().double()).square() for n, lin in factorizable(model).items()}


def energy_rank(s2: dict[str, Tensor], energy: float) -> int:
    """The smallest rank that keeps at least `energy` of Σσ² in every layer of `s2` (spectra())."""
    if not 0 < energy < 1:
        raise SlmError(f"--energy {energy} must be in (0, 1): the share of each layer's Σσ² to keep")
    r = max(int((v.cumsum(0) / v.sum() < energy - 1e-12).sum()) + 1 for v in s2.values())
    for name, v in s2.items():
        if r >= len(v):  # len(σ) = min(out, in), the layer's full rank
            raise SlmError(f"--energy {energy} needs rank {r}, which is not below the rank of {name} ({len(v)}); a "
                           f"factorisation that is not smaller than the layer saves nothing — lower --energy")
    return r


def factorize_model(model: GPT, *, rank: int | None = None, energy: float | None = None) -> GPT:
    """`model` with every block projection replaced by its truncated SVD of rank `rank` (or the rank `energy`
    picks: energy_rank): a new GPT whose config has `lowrank` set, built by the code that loads checkpoints.

    >>> small = factorize_model(model, rank=64)
    >>> small = factorize_model(model, energy=0.9)
    """
    if (rank is None) == (energy is None):
        raise SlmError("give one of --rank R or --energy E")
    layers = factorizable(model)
    r = rank if rank is not None else energy_rank(spectra(model), energy)  # type: ignore[arg-type]
    if r < 1:
        raise SlmError(f"--rank {r} must be >= 1")
    for name, lin in layers.items():
        N, K = lin.weight.shape
        if r >= min(N, K):
            raise SlmError(f"--rank {r} is not below the rank of {name} ({N}×{K}: {min(N, K)}); a factorisation that "
                           f"is not smaller than the layer saves nothing")
    sd = checkpoint._state_dict(model)
    for name, lin in layers.items():
        del sd[f"{name}.weight"]
        bias = sd.pop(f"{name}.bias", None)
        sd[f"{name}.a.weight"], sd[f"{name}.b.weight"] = _factors(lin.weight.detach(), r)
        if bias is not None:
            sd[f"{name}.b.bias"] = bias
    return checkpoint.model_from_state_dict(model.config.replace(lowrank=r), sd, "the factorised model").eval()


def factorize_run(
    src: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    heal: str | float | None = None,
    heal_steps: int | None = None,
    heal_data_dir: str | Path | None = None,
    heal_kl: float = 0.5,
    heal_lr: float = 1e-3,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Factorise the checkpoint (or run's latest) at `src` and write it to `out` (a checkpoint whose config has
    `lowrank`). Returns `out`. Healing as in `slmkit.compress.prune.prune_run`. meta.json records the rank, the
    share of Σσ² each layer kept, parameter counts, and (where the parent has its data) bits per byte and KL to it.

    >>> factorize_run("runs/shk", "runs/shk-r64", rank=64, heal="5m")  # doctest: +SKIP
    """
    if (rank is None) == (energy is None):
        raise SlmError("give one of --rank R or --energy E")
    heal_time = parse_duration(heal)
    healing = heal_time is not None or heal_steps is not None
    ck, parent_meta = load_parent(src, out, overwrite=overwrite, action="factorize")
    data = heal_data(parent_meta, ck.tokenizer.sha256, heal_data_dir, required=healing)
    parent = ck.model
    s2 = spectra(parent)
    t0 = time.perf_counter()
    model = factorize_model(parent, rank=rank if rank is not None else energy_rank(s2, energy))  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    r = model.config.lowrank
    kept = {name: round(float(v[:r].sum() / v.sum()), 6) for name, v in s2.items()}
    # the parent is not changed by factorising (a new model is built), so it is the teacher and reference as it is
    after = heal_and_compare(model, parent, data, max_time=heal_time, max_steps=heal_steps, kl_weight=heal_kl,
                             lr=heal_lr, progress=progress)
    n = model.num_params
    counts = {"total": n(), "active": n(active=True), "non_embedding": n(non_embedding=True)}
    recipe = {"rank": rank, "energy": energy,
              "heal": {"time": heal_time, "steps": heal_steps, "kl_weight": heal_kl, "lr": heal_lr,
                       "data": str(data)} if healing else None}
    meta = run.new_meta("factorize", parent=ck.path, model_class=run.model_class(parent_meta), recipe=recipe,
                        factorization={"rank": r, "energy_kept": kept, "layers": len(kept)},
                        counts=counts, parent_counts={"total": parent.num_params()},
                        factorize_time=round(seconds, 3), **after, params=counts, data=parent_meta.get("data"),
                        data_meta=parent_meta.get("data_meta"))
    return write_run(Path(out), lambda tmp: checkpoint.write_model(tmp, model), ck.tokenizer, meta)
