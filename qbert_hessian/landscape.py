"""Loss landscapes: the task loss on a 1-D line or 2-D plane through the weights of one block (or the model).

    L(alpha, beta) = L(w + alpha d_1 + beta d_2)         on fixed batches, the other parameters held fixed

Directions (``d_1``, ``d_2``):
- ``eigen``: the top Hessian eigenvectors of the block (unit norm; the second deflated against the first), as
  Q-BERT's Figure 2, so the axes show the sharpest directions;
- ``extreme``: the eigenvectors of the largest and of the smallest (most negative) eigenvalue, the Ritz vectors
  of one Lanczos run: at a saddle the surface curves up along the first axis and down along the second (a
  1-D line follows the second);
- ``random``: Gaussian directions, filter-normalised (Li et al. 2018): each row of a matrix is rescaled to the
  norm of the same row of the weights, vectors (biases, LayerNorm) are left at zero;
- ``gradient``: the loss gradient, filter-normalised, then a filter-normalised random second direction
  orthogonalised against it.

The loss at every grid point averages the same fixed batches. Rows of the grid are written as they finish, so
an interrupted run resumes without recomputing them.

Under torch.distributed (torchrun) the grid points of each row are dealt out over the ranks and gathered after
the row; every rank walks rank 0's directions (the eigenvectors come from data-parallel products when there
are at least as many batches as ranks), so the surface is the one a single process computes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .artifacts import CREATED_BY, read_json, write_json
from .config import Direction, LandscapeConfig
from .errors import QBHError
from .hessian import vec
from .hessian.eigen import top_eigenvalues
from .hessian.hvp import BlockHessian, curvature_mode, grads_enabled, loss_weight, model_loss
from .hessian.lanczos import lanczos, randn_start
from .models import BlockMap, curvature_kernels

if TYPE_CHECKING:
    from torch import nn

    from .tasks import Task

logger = logging.getLogger(__name__)
LANDSCAPE_SCHEMA = "qbert_hessian.landscape/1"
WHOLE_MODEL = "model"


@dataclasses.dataclass
class Landscape:
    """A loss surface (``landscape.json``): ``loss[j][i]`` at (alphas[i], betas[j]); NaN where not yet computed."""

    model: dict[str, Any]
    task: str
    block: str
    num_params: int
    directions: dict[str, Any]
    alphas: list[float]
    betas: list[float]
    loss: list[list[float]]
    config: dict[str, Any]
    center_loss: float
    seconds: float = 0.0
    schema: str = LANDSCAPE_SCHEMA
    created_by: str = CREATED_BY

    @property
    def complete(self) -> bool:
        return all(math.isfinite(x) for row in self.loss for x in row)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["loss"] = [[x if math.isfinite(x) else None for x in row] for row in self.loss]
        return {"schema": out.pop("schema"), "created_by": out.pop("created_by"), **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Landscape:
        data = dict(data)
        data["loss"] = [[math.nan if x is None else float(x) for x in row] for row in data["loss"]]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path) -> Any:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> Landscape:
        return cls.from_dict(read_json(path, LANDSCAPE_SCHEMA))


def filter_normalized(params: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random direction whose every row has the norm of the same row of ``params``; vectors get zero."""
    noise = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    return _filter_scale(noise, params)


def _filter_scale(d: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale each row of ``d`` to the norm of the matching row of ``params`` (vectors -> zero)."""
    out = []
    for x, p in zip(d, params):
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        rx, rp = x.reshape(p.shape[0], -1), p.detach().reshape(p.shape[0], -1)
        out.append((rx * rp.norm(dim=1, keepdim=True) / rx.norm(dim=1, keepdim=True).clamp(min=1e-12)).reshape(p.shape))
    return out


def _batches(task: Task, config: LandscapeConfig) -> list[dict[str, torch.Tensor]]:
    data = task.train if config.split == "train" else task.dev
    n = config.batch_size * config.num_batches
    if n > len(data):
        raise QBHError(
            f"the landscape needs {n} {config.split} examples but the split has {len(data)}; lower --batch-size"
        )
    idx = sorted(np.random.default_rng([config.seed, 11]).choice(len(data), size=n, replace=False).tolist())
    return [task.batch(config.split, idx[i : i + config.batch_size]) for i in range(0, n, config.batch_size)]


def block_parameters(model: nn.Module, block: str) -> list[torch.nn.Parameter]:
    """The parameters of a canonical block, or of the whole model for ``model``."""
    if block == WHOLE_MODEL:
        return [p for p in model.parameters()]
    return BlockMap(model).parameters(block)


def directions_for(
    model: nn.Module,
    params: list[torch.nn.Parameter],
    batches: list[dict[str, torch.Tensor]],
    config: LandscapeConfig,
    generator: torch.Generator,
) -> tuple[list[list[torch.Tensor]], dict[str, Any]]:
    """The ``dims`` directions and their description (kind, eigenvalues or norms)."""
    kind = config.directions
    if kind == Direction.RANDOM:
        dirs = [filter_normalized(params, generator) for _ in range(config.dims)]
        return dirs, {"kind": kind.value, "normalization": "filter"}
    if kind in (Direction.EIGEN, Direction.EXTREME):
        data_parallel = 1 < distributed.world_size() <= len(batches)
        with grads_enabled(params):
            mine = distributed.shard(batches) if data_parallel else batches
            hvp = BlockHessian(model, params, mine, data_parallel=data_parallel)
            try:
                return _eigen_directions(hvp, params, config, generator)
            finally:
                hvp.free()
    device = params[0].device
    total = sum(loss_weight(b) for b in batches)
    grads = [torch.zeros_like(p) for p in params]
    with grads_enabled(params):
        for b in batches:
            loss = model_loss(model, {k: v.to(device) for k, v in b.items()}) * (loss_weight(b) / total)
            for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc += g
    g_dir = _filter_scale(grads, params)
    dirs = [g_dir]
    if config.dims == 2:
        r = filter_normalized(params, generator)
        coef = vec.dot(r, g_dir) / max(vec.dot(g_dir, g_dir), 1e-30)
        dirs.append(vec.axpy(-coef, g_dir, r))
    return dirs, {"kind": "gradient", "normalization": "filter", "gradient_norm": vec.norm(grads)}


def _eigen_directions(
    hvp: BlockHessian, params: list[torch.nn.Parameter], config: LandscapeConfig, generator: torch.Generator
) -> tuple[list[list[torch.Tensor]], dict[str, Any]]:
    """``eigen``: the ``dims`` largest-magnitude eigenvectors (power iteration with deflation); ``extreme``: the
    Ritz vectors of the largest and smallest eigenvalue from one Lanczos run (the smallest alone for a line)."""
    if config.directions == Direction.EIGEN:
        res = top_eigenvalues(
            hvp, params, k=config.dims, max_iters=config.max_iters, tol=config.tol, generator=generator
        )
        desc = {"kind": "eigen", "eigenvalues": res.values, "iterations": res.iters, "converged": res.converged}
        return [[t.detach() for t in v] for v in res.vectors], desc
    ends = lambda evals: np.unique([0, len(evals) - 1])  # noqa: E731  (indices of the smallest and largest Ritz value)
    run = lanczos(hvp, randn_start(params, generator), max_steps=config.max_iters, tol=config.tol, watch=ends)
    if config.dims == 2 and len(run.ritz_values) < 2:  # the largest and the smallest would be one vector
        raise QBHError(
            f"the Lanczos run found a single eigenvalue after {run.steps} step(s), so the extreme directions would "
            "be one vector twice; raise --max-iters (at least 2), or use --directions eigen"
        )
    if not run.converged:
        logger.warning(
            "extreme directions: Lanczos did not converge in %d steps (tol %g); the axes are approximate "
            "eigenvectors, raise --max-iters for exact ones",
            run.steps,
            config.tol,
        )
    picks = [len(run.ritz_values) - 1, 0] if config.dims == 2 else [0]
    desc = {
        "kind": "extreme",
        "eigenvalues": [float(run.ritz_values[j]) for j in picks],
        "iterations": [run.steps] * len(picks),
        "converged": [run.converged] * len(picks),
    }
    return [[t.detach() for t in run.vector(j)] for j in picks], desc


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    total = sum(loss_weight(b) for b in batches)
    return math.fsum(
        float(model_loss(model, {k: v.to(device) for k, v in b.items()})) * loss_weight(b) / total for b in batches
    )


def loss_landscape(
    model: nn.Module,
    task: Task,
    config: LandscapeConfig = LandscapeConfig(),
    *,
    block: str = "encoder.0",
    model_name: str = "model",
    resume: Landscape | None = None,
    on_row: Callable[[Landscape], None] | None = None,
    progress: bool = True,
) -> Landscape:
    """The loss on a grid around the current weights of ``block`` (``model`` for all parameters).

    Args:
        model: an HF classifier; weights are restored afterwards, its train/eval mode too.
        task: the tokenized task (batches from ``config.split``).
        config: directions, grid and data settings.
        block: a canonical block name or ``model``.
        model_name: how the model is named in the artifact.
        resume: a partial landscape of the same settings: its finished rows are kept (and its directions
            recomputed identically from the seed).
        on_row: called with the partial landscape after every finished row (rank 0 only under torch.distributed,
            where every rank computes a share of each row and returns the whole surface).
        progress: show a tqdm bar over grid points (rank 0 only).

    Raises:
        QBHError: an unknown block, too little data, or a ``resume`` made with other settings.
    """
    params = block_parameters(model, block)
    device = params[0].device
    batches = _batches(task, config)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    alphas = np.linspace(-config.radius, config.radius, config.grid).tolist()
    betas = np.linspace(-config.radius, config.radius, config.grid).tolist() if config.dims == 2 else [0.0]
    with curvature_kernels(model), curvature_mode(model):
        dirs, desc = directions_for(model, params, batches, config, generator)
        if distributed.world_size() > 1:  # one set of directions for every rank: rank 0's
            distributed.broadcast_([t for d in dirs for t in d])
            desc = distributed.broadcast_object(desc)
        center = _mean_loss(model, batches, device)
        loss = [[math.nan] * len(alphas) for _ in betas]
        if resume is not None:
            if resume.config != config.to_dict() or resume.block != block:
                raise QBHError("cannot resume a landscape made with other settings or for another block; use --force")
            loss = [list(row) for row in resume.loss]
        ls = Landscape(
            model=BlockMap(model).describe(model_name),
            task=task.name,
            block=block,
            num_params=sum(p.numel() for p in params),
            directions=desc,
            alphas=alphas,
            betas=betas,
            loss=loss,
            config=config.to_dict(),
            center_loss=center,
            seconds=resume.seconds if resume else 0.0,
        )
        w0 = [p.detach().clone() for p in params]
        todo = sum(1 for row in loss for x in row if not math.isfinite(x))
        bar = tqdm(total=todo, desc=f"landscape {block}", disable=not (progress and distributed.is_main()))
        try:
            for j, b in enumerate(betas):
                pending = [i for i, x in enumerate(loss[j]) if not math.isfinite(x)]
                if not pending:
                    continue
                mine = {}
                for i in distributed.shard(pending):
                    with torch.no_grad():
                        for p, w, d1, d2 in zip(params, w0, dirs[0], dirs[-1]):
                            p.copy_(w + alphas[i] * d1 + (b * d2 if config.dims == 2 else 0.0))
                    mine[i] = _mean_loss(model, batches, device)
                    bar.update(1)
                for share in distributed.all_gather_objects(mine):
                    for i, value in share.items():
                        loss[j][i] = value
                bar.update(len(pending) - len(mine))
                ls.seconds = (resume.seconds if resume else 0.0) + time.perf_counter() - start
                if on_row is not None and distributed.is_main():
                    on_row(ls)
        finally:
            bar.close()
            with torch.no_grad():
                for p, w in zip(params, w0):
                    p.copy_(w)
    ls.seconds = (resume.seconds if resume else 0.0) + time.perf_counter() - start
    return ls
