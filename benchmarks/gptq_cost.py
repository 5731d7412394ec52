"""What second-order rounding (GPTQ) costs: the time to draw and tokenize the calibration sequences, record every
quantized linear's input Hessian and round the whole encoder, against nearest rounding of the same plan.

    PYTHONPATH=. python benchmarks/gptq_cost.py --model minilm-l6 --data ../shared/data/sst2 --max-length 64
    PYTHONPATH=. python benchmarks/gptq_cost.py --model bert-base-random --data ../shared/data/sst2 --max-length 64
    PYTHONPATH=. python benchmarks/gptq_cost.py --model minilm-l6 --task squad --data ../shared/data/squad \
        --max-length 384      # SQuAD-length calibration sequences (128 windows of up to 384 tokens)

``bert-base-random`` is BERT-base's shape (12 layers, hidden 768, 12 heads, FFN 3072, MiniLM's vocabulary and
tokenizer) with random weights: the cost does not depend on the weights. Every encoder linear is rounded (uniform
``--bits`` with ``--groups`` groups, MSE ranges, as a plan would say); the embedding tables keep nearest rounding.
Prints one markdown row per phase; time it on a quiet machine (``--threads`` sets torch's thread count).
"""

from __future__ import annotations

import argparse
import logging
import platform
import time

import torch

from qbert_hessian.artifacts import BitPlan
from qbert_hessian.config import GPTQConfig
from qbert_hessian.models import BlockMap, load_model, load_tokenizer
from qbert_hessian.quant.apply import quant_modules, quantize_model
from qbert_hessian.quant.rounding import calibration_sequences, round_gptq_
from qbert_hessian.tasks import load_raw_task, tokenize_task


def build_model(name: str, task_family: str, num_labels: int):
    if name != "bert-base-random":
        return load_model(name, task_family=task_family, num_labels=num_labels, eager=False)
    from transformers import BertConfig

    from qbert_hessian.models import auto_model_class

    tokenizer = load_tokenizer("minilm-l6")
    config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=num_labels, attn_implementation="sdpa")
    torch.manual_seed(0)
    return auto_model_class(task_family).from_config(config).eval(), tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6", help="minilm-l6, a checkpoint folder, or bert-base-random")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--groups", default="128")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    raw = load_raw_task(args.task, data_dir=args.data)
    model, tokenizer = build_model(args.model, raw.family, len(raw.label_names))
    task = tokenize_task(raw, tokenizer, max_length=args.max_length)
    layers = BlockMap(model).num_layers
    groups = int(args.groups) if args.groups.isdigit() else args.groups
    blocks = {"embeddings": {"bits": 8, "groups": "channel"}}
    blocks |= {f"encoder.{i}": {"bits": args.bits, "groups": groups} for i in range(layers)}
    plan = BitPlan(model={}, blocks=blocks, range_method="mse", rounding="gptq", gptq={"damp": args.damp})

    rows = []
    t0 = time.perf_counter()
    nearest = quantize_model(model, plan)
    for _, m in quant_modules(nearest):
        m.quantized()  # the range search and nearest rounding, which GPTQ's grid starts from
    rows.append(("nearest rounding (MSE range search) of every weight", time.perf_counter() - t0))

    t0 = time.perf_counter()
    batches = calibration_sequences(task, args.calib_samples, args.batch_size, seed=0)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    rows.append((f"draw {args.calib_samples} calibration sequences ({tokens:,} real tokens)", time.perf_counter() - t0))

    qmodel = quantize_model(model, plan)
    t0 = time.perf_counter()
    stats = round_gptq_(qmodel, batches, GPTQConfig(calib_samples=args.calib_samples, damp=args.damp), progress=True)
    rows.append(("GPTQ: range search, Hessians and rounding of every encoder linear", time.perf_counter() - t0))
    near = sum(s["nearest"] for s in stats.values())
    kept = sum(min(s["nearest"], s["gptq"]) for s in stats.values())

    print(f"\n{args.model}, {layers} layers, {args.task} (max length {args.max_length}), {args.bits} bits, ")
    print(f"groups {args.groups}; {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"summed layer-output error: GPTQ {kept / near:.3f}x nearest rounding's\n")
    print("| phase | seconds |\n|---|---:|")
    for name, sec in rows:
        print(f"| {name} | {sec:.1f} |")


if __name__ == "__main__":
    main()
