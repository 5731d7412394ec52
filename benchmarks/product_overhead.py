"""Lead for issue 13: the cost of one BlockHessian product against a bare double backward on the same batch.

    python benchmarks/product_overhead.py --model runs/bbc/checkpoint [--blocks encoder.0,encoder.5]

On one padding-free BBC News batch (16 articles, max length 128), for each block: the seconds to build the
graph and per Hessian-vector product of :class:`~qbert_hessian.hessian.hvp.BlockHessian`, beside the same
product as PyHessian makes it (``autograd.grad`` of the create-graph gradient with ``grad_outputs=v``). Both
are warmed up once; products are averaged over ``--repeats``, the two kinds interleaved (both graphs alive). Prints a table; run it on a quiet machine (it
times), with the model from ``make bench``'s BBC checkpoint or any BBC fine-tune.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from transformers import DataCollatorWithPadding

from qbert_hessian.hessian import vec
from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled
from qbert_hessian.models import BlockMap, eager_attention, load_model
from qbert_hessian.tasks import load_raw_task, tokenize_task


def interleaved_seconds(calls: list[Callable[[], object]], repeats: int) -> list[float]:
    """Mean seconds per call of each, after one warm-up each, the calls interleaved so that drift in the
    machine's speed hits them alike."""
    for call in calls:
        call()
    seconds = [0.0] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            seconds[i] += time.perf_counter() - start
    return [s / repeats for s in seconds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--blocks", default="encoder.0,encoder.5")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    task = tokenize_task(load_raw_task("bbc-news"), tok, max_length=128)
    batch = DataCollatorWithPadding(tok)([task.train[i] for i in range(16)])
    batch = dict(batch)
    padding = 1 - batch["attention_mask"].float().mean().item()
    print(f"batch {tuple(batch['input_ids'].shape)}, padding {padding:.0%}, {torch.get_num_threads()} threads")
    print("| block | ours: build s | ours: ms/product | bare: build s | bare: ms/product | ours / bare |")
    print("|---|---:|---:|---:|---:|---:|")
    block_map = BlockMap(model)
    with eager_attention(model), curvature_mode(model):
        for name in args.blocks.split(","):
            params = block_map.parameters(name)
            with grads_enabled(params):
                start = time.perf_counter()
                hvp = BlockHessian(model, params, [batch])
                ours_build = time.perf_counter() - start
                v = vec.randn_like(hvp.like)
                start = time.perf_counter()
                grads = torch.autograd.grad(model(**batch).loss, params, create_graph=True)
                bare_build = time.perf_counter() - start
                bare = functools.partial(torch.autograd.grad, grads, params, grad_outputs=v, retain_graph=True)
                ours, bare = interleaved_seconds([functools.partial(hvp, v), bare], args.repeats)
                hvp.free()
            print(
                f"| {name} | {ours_build:.2f} | {ours * 1e3:.0f} | {bare_build:.2f} | {bare * 1e3:.0f} | "
                f"{ours / bare:.2f} |"
            )


if __name__ == "__main__":
    main()
