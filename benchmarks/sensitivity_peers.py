"""The peers of benchmarks/bench_sensitivity.py: PyHessian, curvlinops (with SciPy's ARPACK) and
hessian-eigenthings, each adapted to one engine signature, and the check of their products against ours.

Each engine takes ``(model, task, block_map, names, batches, cfg)`` and returns ``({block: [top eigenvalue per
draw]}, the number of Hessian-vector products it made)``; every peer's operator is wrapped to count its products
without changing them. The peers are imported inside the engines, so this module imports without them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from qbert_hessian.hessian import vec
from qbert_hessian.hessian.hvp import BlockHessian, grads_enabled
from qbert_hessian.hessian.memory import reuse_freed_memory
from qbert_hessian.hessian.vec import randn_like

# The PyPI distribution of each peer (its version goes into the table).
DISTRIBUTIONS = {
    "pyhessian": "pyhessian",
    "curvlinops": "curvlinops-for-pytorch",
    "hessian_eigenthings": "hessian-eigenthings",
}

Eigs = dict[str, list[float]]


class PackedInputs(nn.Module):
    """PyHessian calls ``model(inputs)``: pack ids, mask and token types into one (B, 3, T) tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=packed[:, 0], attention_mask=packed[:, 1], token_type_ids=packed[:, 2]).logits


def pack(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]], 1), batch["labels"]


class DictInputs(nn.Module):
    """curvlinops calls ``model_func(X)``: X is the batch's dict of inputs (no labels), the output the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.model(**inputs).logits


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
