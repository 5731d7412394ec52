"""Probe: where the float32 products of ``precision = mixed`` should come from, timed on one batch.

``mixed`` searches on bf16 products and certifies every block-draw's value with float32 products. The engine gets
both kinds from **one float32 graph per draw**, running the bf16 products under autocast (``autocast-products``
below; the graph, its saved activations and every non-matrix operation stay float32). The alternatives, each timed
here on the first draw's batch over every block's parameters (the shared graph of the protocol):

- ``fp32``: today's engine: a float32 graph, float32 products (the baseline);
- ``autocast-products``: the same float32 graph, products under bf16 autocast (what ``bf16``/``mixed`` do);
- ``bf16-graph``: the graph itself built under autocast (bf16 activations saved, fp32 parameters): cheaper
  products, but no float32 product can come out of it, so ``mixed`` would also build the float32 graph once per
  draw for its certificates (``second graph``), or rebuild a block's own float32 graph for each certificate
  (``recompute``);
- ``bf16-model``: a bfloat16 copy of the model (bf16 parameters too), its own graph; again a second graph for the
  certificates.

For each, the graph's build time, one product per block (mean over ``--reps``) and the relative error of that
product against the float32 one; then the cost of one draw of ``mixed`` under each way of certifying, for
``--products`` bf16 products and one float32 certificate per block-draw (302 products over 70 block-draws on BBC:
about 4.3 each; a certificate that misses the tolerance adds float32 products, the same for every option):

    python benchmarks/precision_probe.py --task bbc-news --model runs/bbc/checkpoint
    python benchmarks/precision_probe.py --task sst2 --model runs/sst2/checkpoint --data ../shared/data/sst2

Nothing is written but stdout (markdown). Timings need a quiet machine; the errors do not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable

import torch

from qbert_hessian.config import SensitivityConfig
from qbert_hessian.hessian import vec
from qbert_hessian.hessian.hvp import BlockHessian, autocast_products, curvature_mode, grads_enabled
from qbert_hessian.models import BlockMap, curvature_kernels, load_model
from qbert_hessian.sensitivity import draw_indices
from qbert_hessian.tasks import load_raw_task, tokenize_task

DEFAULTS = {"sst2": (32, 64), "bbc-news": (16, 128)}  # batch size, max length (as bench_sensitivity.py)


def clock(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn: Callable[[], object], reps: int, device: str) -> float:
    """Mean seconds of ``fn`` over ``reps`` calls, after one warm-up call."""
    fn()
    start = clock(device)
    for _ in range(reps):
        fn()
    return (clock(device) - start) / reps


def autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16)


def probe(model, bm: BlockMap, names: list[str], batch: dict, reps: int, device: str) -> dict[str, dict]:
    """{option: {"graph": s, "product": {block: s}, "error": {block: rel}}}, plus a block's own graph ("recompute")."""
    union = list({id(p): p for n in names for p in bm.parameters(n)}.values())
    out: dict[str, dict] = {}
    vectors = {n: None for n in names}
    exact: dict[str, torch.Tensor] = {}

    def run(option: str, m, build: Callable[[], contextlib.AbstractContextManager], product_ctx) -> None:
        params = list({id(p): p for n in names for p in BlockMap(m).parameters(n)}.values())
        with grads_enabled(params):
            start = clock(device)
            with build():
                H = BlockHessian(m, params, [batch])
            graph = clock(device) - start
            res = {"graph": graph, "product": {}, "error": {}}
            for n in names:
                view = H.block(BlockMap(m).parameters(n))
                if vectors[n] is None:
                    vectors[n] = vec.normalize(vec.randn_like(view.like, torch.Generator().manual_seed(0)))
                v = [x.to(p.dtype) for x, p in zip(vectors[n], view.like)]
                op = autocast_products(view) if product_ctx else view
                res["product"][n] = timed(lambda op=op, v=v: op(v), reps, device)
                hv = vec.flatten(op(v)).float()
                if option == "fp32":
                    exact[n] = hv
                res["error"][n] = float((hv - exact[n]).norm() / exact[n].norm())
            H.free()
        out[option] = res

    run("fp32", model, contextlib.nullcontext, False)
    run("autocast-products", model, contextlib.nullcontext, True)
    run("bf16-graph", model, lambda: autocast(device), False)
    low = copy.deepcopy(model).to(torch.bfloat16)
    with curvature_kernels(low), curvature_mode(low):
        run("bf16-model", low, contextlib.nullcontext, False)
    del low
    # recompute: a block's own float32 graph and one product, for one certificate
    rec = {"graph": 0.0, "product": {}, "error": {}}
    for n in names:
        params = bm.parameters(n)

        def once(params=params, n=n) -> None:
            H = BlockHessian(model, params, [batch])
            H(vectors[n])
            H.free()

        with grads_enabled(params):
            rec["product"][n] = timed(once, reps, device)
        rec["error"][n] = 0.0
    out["recompute"] = rec
    del union
    return out


def render(res: dict[str, dict], names: list[str], products: float, batch: dict, about: str) -> str:
    rows = ["| option | graph | " + " | ".join(f"`{n}`" for n in names) + " | max error |"]
    rows.append("|---|---:|" + "---:|" * len(names) + "---:|")
    for option, r in res.items():
        graph = "per block" if option == "recompute" else f"{1000 * r['graph']:.0f} ms"
        cells = [f"{1000 * r['product'][n]:.0f} ms" for n in names]
        err = "exact" if option in ("fp32", "recompute") else f"{100 * max(r['error'].values()):.2f}%"
        rows.append(f"| {option} | {graph} | " + " | ".join(cells) + f" | {err} |")
    f32, ap, g16, m16 = (res[k] for k in ("fp32", "autocast-products", "bf16-graph", "bf16-model"))
    p32 = sum(f32["product"].values())  # one float32 product of every block
    draw = {
        "fp32 (today)": f32["graph"] + products * p32,
        "mixed, one fp32 graph, autocast products (the engine)": f32["graph"]
        + products * sum(ap["product"].values())
        + p32,
        "mixed, bf16 graph + a second fp32 graph": g16["graph"]
        + products * sum(g16["product"].values())
        + f32["graph"]
        + p32,
        "mixed, bf16 graph + recompute per certificate": g16["graph"]
        + products * sum(g16["product"].values())
        + sum(res["recompute"]["product"].values()),
        "mixed, bf16 model + a second fp32 graph": m16["graph"]
        + products * sum(m16["product"].values())
        + f32["graph"]
        + p32,
        "bf16, one fp32 graph, autocast products": f32["graph"] + products * sum(ap["product"].values()),
        "bf16, bf16 graph": g16["graph"] + products * sum(g16["product"].values()),
    }
    base = draw["fp32 (today)"]
    cost = [f"| {k} | {1000 * t:.0f} ms | {base / t:.2f}x |" for k, t in draw.items()]
    shape = "x".join(map(str, batch["input_ids"].shape))
    return f"""# Where mixed precision's float32 products come from ({about}, one batch {shape})

torch {torch.__version__}, {torch.get_num_threads()} threads. Per block: one product (mean), its error against the float32
product (relative, same vector); "graph": one forward and create-graph backward over every block's parameters.

{chr(10).join(rows)}

One draw over these blocks at {products:g} bf16 products per block (and one float32 certificate each for mixed):

| engine | one draw | vs fp32 |
|---|---:|---:|
{chr(10).join(cost)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(DEFAULTS), default="bbc-news")
    ap.add_argument("--model", default="runs/bbc/checkpoint")
    ap.add_argument("--data", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--blocks", default=None, help="comma-separated (default: embeddings and every layer)")
    ap.add_argument("--products", type=float, default=4.3, help="bf16 products per block-draw (BBC: about 4.3)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    batch_size, max_length = DEFAULTS[args.task]
    batch_size, max_length = args.batch_size or batch_size, args.max_length or max_length
    raw = load_raw_task(args.task, data_dir=args.data)
    model, tok = load_model(args.model, num_labels=len(raw.label_names), eager=True)
    model = model.float().to(args.device)
    task = tokenize_task(raw, tok, max_length=max_length)
    cfg = SensitivityConfig(draws=1, batch_size=batch_size, max_length=max_length)
    batch = {k: v.to(args.device) for k, v in task.batch("train", draw_indices(len(task.train), cfg)[0]).items()}
    bm = BlockMap(model)
    names = bm.expand(args.blocks.split(",") if args.blocks else None)
    with curvature_kernels(model), curvature_mode(model):
        res = probe(model, bm, names, batch, args.reps, args.device)
    print(render(res, names, args.products, batch, f"`{args.model}` on {args.task}"))


if __name__ == "__main__":
    main()
