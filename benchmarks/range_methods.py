"""Weight error of the two range methods: sum over the encoder's linears of ||Q(W) - W||^2, max vs mse, per width.

    PYTHONPATH=. python benchmarks/range_methods.py --model minilm-l6 --groups 128 --bits 2,3,4

Prints a markdown table (error, mse/max ratio, search seconds) to stdout.
"""

from __future__ import annotations

import argparse
import time

import torch

from qbert_hessian.models import BlockMap, load_model
from qbert_hessian.quant.apply import block_modules
from qbert_hessian.quant.functional import group_layout, quant_error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--groups", default="128")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--asymmetric", action="store_true")
    args = ap.parse_args()
    groups = int(args.groups) if args.groups.isdigit() else args.groups
    model, _ = load_model(args.model, num_labels=2)
    block_map = BlockMap(model)
    heads = block_map.num_heads
    mats = []
    for i in range(len(block_map.layers)):
        for name, path, kind in block_modules(block_map, f"encoder.{i}"):
            w = model.get_submodule(path).weight.detach()
            mats.append((w, group_layout(tuple(w.shape), groups, kind=kind, num_heads=heads, name=name)))
    print(f"{args.model}: {len(mats)} encoder matrices, groups={groups}, symmetric={not args.asymmetric}")
    print("| bits | max error | mse error | mse / max | mse search s |")
    print("|---:|---:|---:|---:|---:|")
    for b in map(int, args.bits.split(",")):
        err = {}
        for method in ("max", "mse"):
            t0 = time.perf_counter()
            err[method] = sum(quant_error(w, b, g, not args.asymmetric, method) for w, g in mats)
            seconds = time.perf_counter() - t0
        print(f"| {b} | {err['max']:.4g} | {err['mse']:.4g} | {err['mse'] / err['max']:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
