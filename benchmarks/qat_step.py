"""What a QAT step costs, and where the time goes: seconds per training step of ``train_qat`` under each
distillation setting, with the embedding tables left in FP32 and with SDPA attention, on the same seeded sentences.

    PYTHONPATH=. python benchmarks/qat_step.py --model minilm-l6 --data ../shared/data/sst2 --max-length 64

Each variant trains twice, on a seeded ``--long`` steps' worth of training sentences (batches of ``--batch-size``)
and on a seeded ``--short`` steps' worth of those, and its cost per step is the difference of the two
``train_seconds`` over the difference in steps: the Trainer's set-up, its one evaluation on a seeded ``--dev``
sentences and its checkpoint are paid by both runs and cancel (an untimed run first pays the process's one-time
costs). Batches are random (no length grouping); every variant trains on the same sentences. The plan is the runs'
at 2 bits: every encoder linear 2-bit, 128 groups, MSE ranges, nearest rounding; embedding tables 8-bit per row (one
variant leaves them FP32); 8-bit static activations (an EMA of max|x|) calibrated on 8 training batches. Attention
is eager, as in ``qbert-hessian run`` (its FP32 model is loaded eager for the Hessian's double backward; one variant
uses PyTorch's SDPA kernels instead). The weights do not matter for the cost: the model's classification head is
fresh. Prints a markdown table; time it on a quiet machine (``--threads`` sets torch's thread count).
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import warnings
from pathlib import Path

import torch

from qbert_hessian.artifacts import BitPlan
from qbert_hessian.config import QATConfig
from qbert_hessian.models import BlockMap, load_model
from qbert_hessian.qat import train_qat
from qbert_hessian.quant.apply import quantize_calibrated
from qbert_hessian.tasks import load_raw_task, tokenize_task
from qbert_hessian.tasks.base import dev_subset, subset

# (label, distill, quantized embeddings, eager attention)
VARIANTS = (
    ("distil logits, hidden states and attention (the runs' recipe)", "full", True, True),
    ("the same, embedding tables in FP32", "full", False, True),
    ("distil logits and hidden states", "hidden", True, True),
    ("distil logits", "logits", True, True),
    ("distil logits, SDPA attention", "logits", True, False),
    ("no distillation (task loss only)", "none", True, True),
)


def plan_for(layers: int, embeddings: bool) -> BitPlan:
    """Every encoder linear 2-bit in groups of 128 (MSE ranges); the embedding tables 8-bit per row, or FP32."""
    blocks = {f"encoder.{i}": {"bits": 2, "groups": 128} for i in range(layers)}
    if embeddings:
        blocks["embeddings"] = {"bits": 8, "groups": "channel"}
    return BitPlan(model={}, blocks=blocks, range_method="mse", rounding="nearest", act_bits=8, act_range="max")


def seconds(model, task, plan, distill: str, args, work: Path) -> tuple[float, int]:
    """train_qat's wall time and steps on ``task``'s training sentences, from a fresh quantized copy of ``model``."""
    q = quantize_calibrated(model, plan, task, num_batches=8, batch_size=args.batch_size, seed=0)
    config = QATConfig(epochs=1, lr=5e-5, batch_size=args.batch_size, distill=distill, seed=0)
    log = train_qat(q, task, config, work_dir=work, teacher=model if distill != "none" else None, progress=False)
    return log["train_seconds"], log["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6", help="a model name or checkpoint folder")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--short", type=int, default=8, help="steps of the short run")
    ap.add_argument("--long", type=int, default=40, help="steps of the long run")
    ap.add_argument("--dev", type=int, default=64, help="dev sentences each run evaluates once (cancels out)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if not 0 < args.short < args.long:
        ap.error(f"--short {args.short} and --long {args.long}: need 0 < short < long")
    if args.batch_size < 1 or args.dev < 1:
        ap.error(f"--batch-size {args.batch_size} and --dev {args.dev}: both must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    raw = load_raw_task(args.task, data_dir=args.data)
    raw = dev_subset(subset(raw, args.long * args.batch_size, seed=0), args.dev, seed=0)
    models = {}
    for eager in (True, False):
        model, tokenizer = load_model(
            args.model, task_family=raw.family, num_labels=len(raw.label_names), eager=eager, new_head=True
        )
        models[eager] = model.eval()
    layers = BlockMap(models[True]).num_layers
    # the two runs' sentences, tokenized once: a seeded ``steps`` batches' worth each
    tasks = [
        tokenize_task(subset(raw, n * args.batch_size, seed=0), tokenizer, max_length=args.max_length)
        for n in (args.short, args.long)
    ]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # one untimed run first: the first training in a process pays one-time costs (imports, thread pools)
        seconds(models[True], tasks[0], plan_for(layers, True), "full", args, Path(tmp))
        for label, distill, embeddings, eager in VARIANTS:
            plan, model = plan_for(layers, embeddings), models[eager]
            runs = [seconds(model, task, plan, distill, args, Path(tmp)) for task in tasks]
            (t_short, n_short), (t_long, n_long) = runs
            rows.append((label, (t_long - t_short) / (n_long - n_short), t_long))

    print(f"\n{args.model}, {layers} layers, {args.task} (max length {args.max_length}), batch {args.batch_size}; ")
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"steps {args.short} and {args.long}; encoder 2-bit (128 groups, MSE), embeddings 8-bit per row\n")
    print("| variant | seconds per step | long run, seconds |\n|---|---:|---:|")
    for label, per_step, total in rows:
        print(f"| {label} | {per_step:.3f} | {total:.1f} |")


if __name__ == "__main__":
    main()
