"""Benchmark: Hutchinson vs Hutch++ traces at equal products, and what the shared trace mode saves.

On real blocks of MiniLM-L6 (embeddings and every encoder layer) and the sensitivity protocol's own data draws
(SST-2 by default), for each draw and block:

1. **Variance per product.** ``repeats`` independent runs of ``hutchinson_trace`` and of ``hutchpp_trace`` at
   each budget m (products per estimate, the protocol's ``trace_samples``). The variance of one estimate
   times m is its variance per product: constant for Hutchinson (the variance of one sample v^T H v, taken
   from every Hutchinson probe of the block), falling with m for Hutch++ when the spectrum is dominated by
   a few eigenvalues. Hutch++'s variance at m is the mean of its stated stderr^2 over the repeats (unbiased
   for its variance: ``hessian/trace.py``); the spread of the repeats is printed beside it as a check. The
   ratio Hutch++ / Hutchinson < 1 means Hutch++ gives the smaller standard error for the same products.
2. **The shared mode** (``--trace shared``): ``shared_samples`` full-model probes, each read off for every
   block (``hutchinson_block_traces``). Its per-sample variance on block b over per-block probing's is the
   factor by which it needs more samples for the same standard error; one shared product serves all B
   blocks, so to match per-block probing's standard error on every block it needs m x max_b(ratio_b)
   full-model products where per-block probing needs B x m block products. Seconds per product of each kind
   are measured too, since a full-model product costs more than a block's.

Writes benchmarks/TRACES.md (command, machine, date, tables, verdict). The default estimator is the one with
the smaller variance at the protocol's budget (``SensitivityConfig.trace_samples``).

    python benchmarks/bench_traces.py --model runs/sst2/checkpoint --data ../shared/data/sst2

``--model minilm-l6`` runs on the pretrained encoder with a fresh (random) 2-label head instead of the
fine-tuned checkpoint (made by the command in bench_sensitivity.py's docstring); the protocol analyses
fine-tuned models, so the checkpoint is the one to decide on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qbert_hessian.artifacts import write_text
from qbert_hessian.config import SensitivityConfig
from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled
from qbert_hessian.hessian.trace import hutchinson_block_traces, hutchinson_trace, hutchpp_trace
from qbert_hessian.models import BlockMap, curvature_kernels, load_model
from qbert_hessian.names import blocks_overlap
from qbert_hessian.sensitivity import draw_indices
from qbert_hessian.tasks import load_raw_task, tokenize_task

HERE = Path(__file__).resolve().parent
ESTIMATORS = {"hutchinson": hutchinson_trace, "hutchpp": hutchpp_trace}


@dataclasses.dataclass
class Point:
    """R estimates of one block's trace on one draw by one estimator at a budget of m products."""

    means: list[float] = dataclasses.field(default_factory=list)
    stated_var: list[float] = dataclasses.field(default_factory=list)  # stderr^2 of each estimate
    samples: list[float] = dataclasses.field(default_factory=list)  # Hutchinson's v^T H v, for its variance
    products: int = 0
    seconds: float = 0.0


def seed_of(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def measure_block(hvp: BlockHessian, budgets: list[int], products_per_point: int, key: tuple[int, ...]) -> dict:
    """Both estimators at every budget on one block's Hessian: {(estimator, m): Point}."""
    hvp([torch.zeros_like(x) for x in hvp.like])  # warm-up, not timed: the first product allocates buffers
    out = {}
    for m in budgets:
        repeats = max(4, products_per_point // m)
        for e, (name, estimator) in enumerate(ESTIMATORS.items()):
            point = Point()
            for r in range(repeats):
                g = torch.Generator().manual_seed(seed_of(*key, m, e, r))
                t0 = time.perf_counter()
                res = estimator(hvp, hvp.like, min_samples=m, max_samples=m, generator=g)
                point.seconds += time.perf_counter() - t0
                assert res.products == m, (name, m, res.products)  # equal products, by construction
                point.products += res.products
                point.means.append(res.mean)
                point.stated_var.append(res.stderr**2)
                if name == "hutchinson":
                    point.samples.extend(res.samples)
            out[name, m] = point
    return out


def summarize_block(points: list[dict], budgets: list[int]) -> dict:
    """Per-product variances of one block, averaged over the draws' Hessians."""
    per_draw = []
    for pts in points:
        samples = [s for m in budgets for s in pts["hutchinson", m].samples]
        sigma2 = float(np.var(samples, ddof=1))  # one Hutchinson sample's variance = its variance per product
        row = {"hutchinson": sigma2, "trace": float(np.mean(samples)), "trace_se": math.sqrt(sigma2 / len(samples))}
        for m in budgets:
            p = pts["hutchpp", m]
            row["hutchpp", m] = m * float(np.mean(p.stated_var))
            row["hutchpp_spread", m] = m * float(np.var(p.means, ddof=1))
            row["hutchinson_spread", m] = m * float(np.var(pts["hutchinson", m].means, ddof=1))
        per_draw.append(row)
    keys = per_draw[0].keys()
    out = {k: float(np.mean([r[k] for r in per_draw])) for k in keys}
    # the standard error of the trace averaged over draws
    out["trace_se"] = math.sqrt(sum(r["trace_se"] ** 2 for r in per_draw)) / len(per_draw)
    return out


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6", help="a fine-tuned checkpoint folder, or minilm-l6")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--blocks", default=None, help="comma-separated blocks (default: embeddings, every layer)")
    ap.add_argument("--draws", type=int, default=2, help="data draws (each its own Hessian)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--budgets", default="4,12,24", help="products per estimate (the protocol's trace_samples)")
    ap.add_argument("--products-per-point", type=int, default=96, help="products per (block, draw, estimator, m)")
    ap.add_argument("--shared-samples", type=int, default=64, help="full-model probes per draw for --trace shared")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "TRACES.md"))
    args = ap.parse_args()
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    if budgets[0] < 4:
        ap.error("every budget must be at least 4 products (Hutch++: a sketch of 1 and 2 residual probes)")

    raw = load_raw_task(args.task, data_dir=None if args.task == "bbc-news" else args.data)
    model, tok = load_model(args.model, num_labels=len(raw.label_names), eager=True)
    model = model.float()
    task = tokenize_task(raw, tok, max_length=args.max_length)
    cfg = SensitivityConfig(
        draws=args.draws, batch_size=args.batch_size, max_length=args.max_length, trace_samples=budgets[0]
    )
    bm = BlockMap(model)
    names = bm.expand(args.blocks.split(",") if args.blocks else None)
    draws = [[task.batch("train", idx)] for idx in draw_indices(len(task.train), cfg)]

    started = time.perf_counter()
    points: dict[str, list[dict]] = {n: [] for n in names}
    block_seconds: dict[str, float] = {}
    with curvature_kernels(model), curvature_mode(model):
        for d, batches in enumerate(draws):
            for b, name in enumerate(names):
                params = bm.parameters(name)
                with grads_enabled(params):
                    hvp = BlockHessian(model, params, batches, length_buckets=cfg.length_buckets)
                    pts = measure_block(hvp, budgets, args.products_per_point, (args.seed, d, b))
                    hvp.free()
                points[name].append(pts)
                h = [pts["hutchinson", m] for m in budgets]
                block_seconds[name] = block_seconds.get(name, 0.0) + sum(p.seconds for p in h)
                print(f"draw {d} {name}: {sum(p.products for p in pts.values())} products", file=sys.stderr)

        # The shared mode: one full-model product per sample, every block read off it.
        disjoint = not any(blocks_overlap(a, c) for i, a in enumerate(names) for c in names[i + 1 :])
        shared: dict[str, list[float]] = {n: [] for n in names}
        shared_seconds, shared_products = 0.0, 0
        if disjoint and len(names) > 1:
            params, slices = [], []
            for name in names:
                p = bm.parameters(name)
                slices.append(slice(len(params), len(params) + len(p)))
                params.extend(p)
            for d, batches in enumerate(draws):
                with grads_enabled(params):
                    hvp = BlockHessian(model, params, batches, length_buckets=cfg.length_buckets)
                    g = torch.Generator().manual_seed(seed_of(args.seed, d, 999_983))
                    hvp([torch.zeros_like(x) for x in hvp.like])  # warm-up, not timed
                    t0 = time.perf_counter()
                    results = hutchinson_block_traces(
                        hvp, hvp.like, slices, num_samples=args.shared_samples, generator=g
                    )
                    shared_seconds += time.perf_counter() - t0
                    shared_products += args.shared_samples
                    hvp.free()
                for name, res in zip(names, results):
                    shared[name].append(float(np.var(res.samples, ddof=1)))
    total_seconds = time.perf_counter() - started

    rows = {name: summarize_block(points[name], budgets) for name in names}
    num_params = {name: bm.num_params(name) for name in names}
    block_products = {name: sum(p["hutchinson", m].products for p in points[name] for m in budgets) for name in names}

    # --- the variance table
    head = "| block | params | trace +- se | Hutchinson var / product |"
    rule = "|---|---:|---:|---:|"
    for m in budgets:
        head += f" Hutch++ m={m} | ratio |"
        rule += "---:|---:|"
    lines = [head, rule]
    ratios = {m: [] for m in budgets}
    for name in names:
        r = rows[name]
        cells = [f"`{name}`", f"{num_params[name]:,}", f"{fmt(r['trace'], 4)} +- {fmt(r['trace_se'], 2)}"]
        cells.append(fmt(r["hutchinson"]))
        for m in budgets:
            ratio = r["hutchpp", m] / r["hutchinson"]
            ratios[m].append(ratio)
            cells += [fmt(r["hutchpp", m]), f"**{ratio:.2f}**" if ratio < 1 else f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    check = ["| block | " + " | ".join(f"m={m}: Hutchinson / Hutch++ (spread of repeats)" for m in budgets) + " |"]
    check.append("|---|" + "---:|" * len(budgets))
    for name in names:
        r = rows[name]
        cells = [f"{fmt(r['hutchinson_spread', m])} / {fmt(r['hutchpp_spread', m])}" for m in budgets]
        check.append(f"| `{name}` | " + " | ".join(cells) + " |")
    check_table = "\n".join(check)

    verdict = []
    for m in budgets:
        x = np.array(ratios[m])
        wins = int((x < 1).sum())
        verdict.append(
            f"- m = {m} products: Hutch++ has the smaller variance on {wins} of {len(x)} blocks; variance ratio "
            f"Hutch++ / Hutchinson geometric mean {math.exp(np.log(x).mean()):.2f} (range {x.min():.2f}-{x.max():.2f}); "
            f"standard-error ratio {math.exp(np.log(x).mean() / 2):.2f}"
        )
    default_m = SensitivityConfig().trace_samples
    at_default = ratios.get(default_m)
    if at_default is not None:
        g = math.exp(np.log(at_default).mean())
        pick = "hutchpp" if g < 1 else "hutchinson"
        verdict.append(
            f"\nAt the protocol's default budget (trace_samples = {default_m} products per draw and block), the "
            f"estimator with the smaller standard error is **{pick}** (geometric-mean variance ratio {g:.2f})."
        )
    verdict_text = "\n".join(verdict)

    # --- the shared mode
    if any(shared.values()):
        srows = [
            "| block | per-block var / sample | shared var / sample | ratio | s / block product |",
            "|---|---:|---:|---:|---:|",
        ]
        sratio = {}
        for name in names:
            per_block = rows[name]["hutchinson"]
            sh = float(np.mean(shared[name]))
            sratio[name] = sh / per_block
            secs = block_seconds[name] / block_products[name]
            srows.append(f"| `{name}` | {fmt(per_block)} | {fmt(sh)} | {sratio[name]:.2f} | {secs * 1000:.0f} ms |")
        worst = max(sratio.values())
        B = len(names)
        t_full = shared_seconds / shared_products
        t_blocks = sum(block_seconds[n] / block_products[n] for n in names)
        m = default_m
        shared_text = f"""{chr(10).join(srows)}

One full-model product: {t_full * 1000:.0f} ms (all {B} blocks' parameters, {shared_products} products over the draws).

To give every block the standard error of per-block probing with m probes each, the shared mode needs
m x {worst:.2f} (the largest ratio) full-model products where per-block probing needs {B} x m block products:
per-block / shared products = **{B / worst:.2f}** (above 1 the shared mode saves products). In time, per unit
of m: {worst:.2f} x {t_full:.3f} s = {worst * t_full:.3f} s shared against {t_blocks:.3f} s per-block (the blocks'
products summed): per-block / shared time = **{t_blocks / (worst * t_full):.2f}**. At the default m = {m}:
{math.ceil(m * worst)} full-model products instead of {B * m} block products."""
    else:
        shared_text = "Not measured: the shared mode needs two or more disjoint blocks."

    def per_product(name: str) -> float:
        pts = [p[name, m] for n in names for p in points[n] for m in budgets]
        return sum(p.seconds for p in pts) / sum(p.products for p in pts)

    t_hutchinson, t_hutchpp = per_product("hutchinson"), per_product("hutchpp")
    if torch.cuda.is_available():
        machine = f"{torch.cuda.get_device_name()} present (unused: CPU run)"
    else:
        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    machine += f", torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    command = "python benchmarks/bench_traces.py " + " ".join(sys.argv[1:])
    today = datetime.date.today().isoformat()
    repeats = ", ".join(f"{max(4, args.products_per_point // m)} at m={m}" for m in budgets)
    text = f"""# Trace estimators: Hutchinson vs Hutch++, and the shared mode

Command: `{command}`

Machine: {machine}. Date: {today}. Total time {total_seconds / 60:.1f} min.

Model `{args.model}`, task {args.task}; blocks {", ".join(names)}; {args.draws} draws of {args.batch_size} training
examples (max length {args.max_length}), the protocol's draws (seed {cfg.seed}), length buckets as in the protocol.
Each draw's block Hessian is its own matrix; the numbers are averaged over the draws. Repeats per estimator and
budget: {repeats}.

## Variance per product at equal products

Variance per product = m x Var(one estimate from m products). Hutchinson's is the variance of one sample
v^T H v (all its probes of the block). Hutch++ at m products: a Gaussian sketch of k = m // 3, H Q for its
k columns, m - 2k residual probes; its variance is the mean of its stated stderr^2 over the repeats. **ratio**
= Hutch++ / Hutchinson at the same m: below 1 (bold) Hutch++ gives the smaller standard error for the same
products (by the square root of the ratio).

{table}

{verdict_text}

Check (not used above): m x the variance of the repeats' estimates, Hutchinson / Hutch++ (few repeats: rough).

{check_table}

Hutch++ also spends time outside the products (a QR of the k sketch columns, projecting every probe): per
product, Hutchinson {1000 * t_hutchinson:.0f} ms, Hutch++ {1000 * t_hutchpp:.0f} ms (everything inside the estimator, timed).

## The shared mode (`--trace shared`): products for the same standard error

Per-block probing: Rademacher probes of one block's Hessian (the Hutchinson column above). Shared: {args.shared_samples}
full-model probes per draw; block b's sample is v_b^T (H v)_b, which adds the cross terms v_b^T H_bc v_c (mean
zero, extra variance). ratio = shared / per-block variance of one sample: the factor by which the shared mode
needs more samples for the same standard error on that block.

{shared_text}
"""
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
