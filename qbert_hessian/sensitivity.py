"""Q-BERT's sensitivity protocol: per-block top Hessian eigenvalues over data draws -> SensitivityReport.

For each block b and each of N data draws d (a seeded sample of the training split), power iteration gives
the largest-magnitude eigenvalue lam_{b,d} of the block Hessian H_bb on that draw's loss. Q-BERT (Shen et al.
2020, Sec. 3.2) scores the block by

    Omega_b = |mean_d lam_{b,d}| + std_d lam_{b,d}

so a block whose curvature is large *or* varies a lot between batches gets more bits. Next to it, the
trace Tr(H_bb) (Hutchinson, or Hutch++ with ``trace_method = "hutchpp"``) and HAWQ-V2's normalised trace
Tr(H_bb) / n_b. Hutchinson's samples are pooled over the draws; Hutch++ gives one estimate per draw, and the
block's trace is their mean with standard error sqrt(sum_d se_d^2) / D (:func:`~.hessian.trace.pool_estimates`).

The blocks advance together, draw by draw: a draw's batches get one forward and one ``create_graph`` backward
over every block's parameters, and each block's products run through that one graph
(:meth:`~.hessian.hvp.BlockHessian.block`), where a per-block graph would cost one more forward and backward per block
(benchmarks/PRODUCTS.md). The previous draw's eigenvector warm-starts each block's next draw. After every draw
``on_draw`` gets the report and the state to resume from (each block's values so far, warm start and random
generator), so a stopped run continues with the numbers of a run never stopped; ``on_block`` gets the report
once the blocks are finished.

A draw is ``batches_per_draw`` batches of ``batch_size`` examples, or Q-BERT's protocol, a share
``draw_fraction`` of the training split (10%) cut into batches of ``batch_size``.

Under torch.distributed (torchrun) the work is shared in one of two ways (:class:`~qbert_hessian.config.Parallel`),
with the numbers of one process either way:

- ``data``: every rank holds its share of each draw's batches and the products are all-reduced
  (:class:`~qbert_hessian.hessian.hvp.BlockHessian` with ``data_parallel``); the solvers run on every rank alike;
- ``blocks``: every rank takes every world-th block, computed as one process would (same seeds); the ranks'
  states are gathered after every draw and their blocks at the end; the writers are called on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .artifacts import BlockSensitivity, SensitivityReport, TraceStats, fingerprint
from .config import EigenMethod, Parallel, Precision, SensitivityConfig, TraceMethod, TraceMode
from .errors import QBHError
from .hessian import vec
from .hessian.eigen import certified_lanczos_eigenvalues, lanczos_eigenvalues, most_negative_eigenvalue, top_eigenvalues
from .hessian.hvp import Batch, BlockHessian, BlockView, LossFn, autocast_products, curvature_mode, grads_enabled
from .hessian.memory import reuse_freed_memory
from .hessian.trace import (
    TraceResult,
    hutchinson_block_traces,
    hutchinson_trace,
    hutchpp_trace,
    pool_estimates,
    summarize,
)
from .models import BlockMap, curvature_kernels

if TYPE_CHECKING:
    from torch import nn

    from .tasks import Task

logger = logging.getLogger(__name__)


def draw_size(num_examples: int, config: SensitivityConfig) -> int:
    """Examples in one draw: round(draw_fraction x num_examples) (at least 1), else batch_size x batches_per_draw."""
    if config.draw_fraction is not None:
        return max(1, round(config.draw_fraction * num_examples))
    return config.batch_size * config.batches_per_draw


def batches_in_draw(num_examples: int, config: SensitivityConfig) -> int:
    """Batches of ``batch_size`` in one draw (the last one may be smaller with ``draw_fraction``)."""
    return -(-draw_size(num_examples, config) // config.batch_size)


def draw_indices(num_examples: int, config: SensitivityConfig) -> list[list[int]]:
    """Example indices of every draw: :func:`draw_size` rows sampled with seed (seed, draw)."""
    size = draw_size(num_examples, config)
    if size > num_examples:
        raise QBHError(
            f"a draw needs {size} training examples but the task has {num_examples}; lower "
            "SensitivityConfig.batch_size or SensitivityConfig.batches_per_draw (or use a draw_fraction)"
        )
    return [
        sorted(np.random.default_rng([config.seed, d]).choice(num_examples, size=size, replace=False).tolist())
        for d in range(config.draws)
    ]


def parallel_mode(config: SensitivityConfig, num_examples: int, num_blocks: int, world: int) -> Parallel:
    """The way ``world`` ranks share ``num_blocks`` blocks: ``config.parallel``, with ``auto`` resolved to
    ``data`` when a draw has at least one batch per rank, else ``blocks``.

    Raises:
        QBHError: ``data`` with fewer batches in a draw than ranks, or ``blocks`` with fewer blocks than ranks
            (some ranks would have nothing to do; the message says what to change).
    """
    batches = batches_in_draw(num_examples, config)
    mode = config.parallel
    if mode == Parallel.AUTO:
        mode = Parallel.DATA if batches >= world else Parallel.BLOCKS
    if world > 1 and mode == Parallel.DATA and batches < world:
        raise QBHError(
            f"SensitivityConfig.parallel data gives every rank a share of each draw's batches, but a draw has "
            f"{batches} batch(es) for {world} ranks; raise SensitivityConfig.batches_per_draw to {world} (or use "
            "SensitivityConfig.draw_fraction), use SensitivityConfig.parallel blocks, or launch fewer ranks"
        )
    if world > 1 and mode == Parallel.BLOCKS and num_blocks < world:
        raise QBHError(
            f"SensitivityConfig.parallel blocks gives every rank whole blocks, but {num_blocks} block(s) are left "
            f"for {world} ranks; use SensitivityConfig.parallel data with SensitivityConfig.batches_per_draw of at "
            f"least {world}, or launch fewer ranks"
        )
    return mode


def _draw_batches(task: Task, indices: list[int], batch_size: int, *, shard: bool = False) -> list[Batch]:
    """The draw's batches, or with ``shard`` this rank's share of them (every world_size-th batch)."""
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return [task.batch("train", c) for c in (distributed.shard(chunks) if shard else chunks)]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single draw)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def _block_generator(config: SensitivityConfig, block: str) -> torch.Generator:
    # Seeded by the block's name, so a block's numbers are the same whichever other blocks run beside it.
    return torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(block.encode()))


@dataclasses.dataclass
class _BlockProgress:
    """One block's results over the draws done so far, and what its next draw starts from (the previous
    draw's eigenvectors, the block's random generator)."""

    generator: torch.Generator
    eig: list[float] = dataclasses.field(default_factory=list)
    top_k: list[list[float]] = dataclasses.field(default_factory=list)
    negative: list[float] = dataclasses.field(default_factory=list)
    iters: list[int] = dataclasses.field(default_factory=list)
    converged: list[bool] = dataclasses.field(default_factory=list)
    traces: list[TraceResult] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    warm: list[list[torch.Tensor]] | None = None

    def to_state(self) -> dict:
        """Plain data and CPU tensors (``torch.save``-able, loadable with ``weights_only``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["generator"] = self.generator.get_state()
        fields["traces"] = [dataclasses.asdict(t) for t in self.traces]
        fields["warm"] = None if self.warm is None else [[t.detach().cpu() for t in v] for v in self.warm]
        return fields

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> _BlockProgress:
        generator = torch.Generator()
        generator.set_state(state["generator"])
        warm = state["warm"]
        return cls(
            **{
                **state,
                "generator": generator,
                "traces": [TraceResult(**t) for t in state["traces"]],
                "warm": None if warm is None else [[t.to(device) for t in v] for v in warm],
            }
        )


def _solve_draw(hvp: BlockHessian | BlockView, block: _BlockProgress, config: SensitivityConfig) -> None:
    """The block's eigenvalues (and trace) on one draw, appended to ``block``; its warm start moves on."""
    generator = block.generator
    # The solvers work in the block's compact space (embedding tables cut to the draw's rows); the warm start is
    # kept whole between draws, whose rows differ.
    like = hvp.like
    start = [hvp.restrict(v) for v in block.warm] if block.warm is not None and config.warm_start else None
    if start is not None and vec.norm(start[0]) == 0.0:
        start = None  # the previous eigenvector lives on rows this draw does not use
    # bf16 and mixed search on bf16 products; mixed certifies every value with float32 products (the same graph)
    low = hvp if config.precision == Precision.FP32 else autocast_products(hvp)
    mixed = config.precision == Precision.MIXED
    if config.method == EigenMethod.LANCZOS:
        kwargs = dict(k=config.top_k, max_iters=config.max_iters, tol=config.tol, most_negative=config.most_negative)
        init = start[0] if start else None
        if mixed:
            res = certified_lanczos_eigenvalues(low, hvp, like, **kwargs, init=init, generator=generator)
        else:
            res = lanczos_eigenvalues(low, like, **kwargs, init=init, generator=generator)
        iters = res.iters[0]
    else:
        res = top_eigenvalues(
            low, like, k=config.top_k, max_iters=config.max_iters, tol=config.tol, init=start, generator=generator
        )
        iters = sum(res.iters)
        if mixed:  # power iteration's own rule, in float32, from the bf16 vectors
            res = top_eigenvalues(
                hvp, like, k=config.top_k, max_iters=config.max_iters, tol=config.tol, init=res.vectors
            )
            iters += sum(res.iters)
        if config.most_negative:
            shift = res.values[0]
            neg = most_negative_eigenvalue(
                low,
                like,
                shift=shift,
                max_iters=config.max_iters,
                tol=config.tol,
                init=res.vectors[0] if shift <= 0 else None,
                generator=generator,
            )
            iters += neg.iters[0]
            if mixed:
                neg = most_negative_eigenvalue(
                    hvp, like, shift=shift, max_iters=config.max_iters, tol=config.tol, init=neg.vectors[0]
                )
                iters += neg.iters[0]
            res.smallest = neg.values[0]
    block.warm = [hvp.expand(v) for v in res.vectors]
    block.iters.append(iters)
    block.eig.append(res.values[0])
    block.top_k.append(res.values)
    block.converged.append(all(res.converged))
    if res.smallest is not None:
        block.negative.append(res.smallest)
    if config.trace == TraceMode.BLOCK:
        estimator = hutchpp_trace if config.trace_method == TraceMethod.HUTCHPP else hutchinson_trace
        m = config.trace_samples
        # bf16 traces under bf16 only: no certificate exists for an estimate, so mixed keeps them float32
        probe = low if config.precision == Precision.BF16 else hvp
        block.traces.append(estimator(probe, like, min_samples=m, max_samples=m, generator=generator))


def _estimate_blocks(
    model: nn.Module,
    blocks: dict[str, list[torch.nn.Parameter]],
    progress: dict[str, _BlockProgress],
    draws: list[list[Batch]],
    first_draw: int,
    config: SensitivityConfig,
    loss_fn: LossFn | None,
    bar: tqdm,
    after_draw: Callable[[int], None],
    data_parallel: bool = False,
) -> None:
    """Every block of ``blocks`` on draws ``first_draw``.. (``draws`` this rank's share under ``data_parallel``),
    draw by draw: with ``config.shared_graph`` one graph per draw over all their parameters, each block's products
    through it (:meth:`BlockHessian.block`), else one graph per block and draw. ``after_draw(d)`` is called once
    draw ``d`` is done for every block."""

    def operator(params: list[torch.nn.Parameter], batches: list[Batch]) -> BlockHessian:
        return BlockHessian(
            model, params, batches, loss_fn, length_buckets=config.length_buckets, data_parallel=data_parallel
        )

    union = list({id(p): p for params in blocks.values() for p in params}.values())
    with grads_enabled(union):
        for d in range(first_draw, len(draws)):
            start = time.perf_counter()
            shared = operator(union, draws[d]) if config.shared_graph else None
            graph = (time.perf_counter() - start) / len(blocks)  # the shared graph, charged to every block alike
            for name, params in blocks.items():
                bar.set_postfix_str(name)
                start = time.perf_counter()
                hvp = shared.block(params) if shared is not None else operator(params, draws[d])
                _solve_draw(hvp, progress[name], config)
                hvp.free()  # a view's is a no-op: the shared graph is dropped below
                progress[name].seconds += graph + time.perf_counter() - start
                bar.update(1)
            if shared is not None:
                shared.free()
            after_draw(d)


def _shared_traces(
    model: nn.Module,
    block_map: BlockMap,
    names: Sequence[str],
    draws: list[list[Batch]],
    config: SensitivityConfig,
    loss_fn: LossFn | None,
    data_parallel: bool = False,
) -> list[TraceStats]:
    """Every block's trace from full-model products, ``trace_samples`` probes per draw, pooled (``draws`` this
    rank's share under ``data_parallel``)."""
    params, slices = [], []
    for name in names:
        p = block_map.parameters(name)
        slices.append(slice(len(params), len(params) + len(p)))
        params.extend(p)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 999_983)
    samples: list[list[float]] = [[] for _ in names]
    with grads_enabled(params):
        for batches in tqdm(draws, desc="shared trace", leave=False, disable=not distributed.is_main()):
            hvp = BlockHessian(
                model, params, batches, loss_fn, length_buckets=config.length_buckets, data_parallel=data_parallel
            )
            probe = autocast_products(hvp) if config.precision == Precision.BF16 else hvp
            results = hutchinson_block_traces(
                probe, hvp.like, slices, num_samples=max(2, config.trace_samples), generator=generator
            )
            for b, res in enumerate(results):
                samples[b].extend(res.samples)
            hvp.free()
    return [TraceStats(r.mean, r.stderr, len(r.samples), TraceMethod.HUTCHINSON.value) for r in map(summarize, samples)]


def _shared_traces_spread(
    model: nn.Module,
    block_map: BlockMap,
    names: Sequence[str],
    draws: list[list[Batch]],
    config: SensitivityConfig,
    loss_fn: LossFn | None,
    data_parallel: bool,
) -> list[TraceStats]:
    """:func:`_shared_traces` on the ranks: data-parallel when every rank can hold a batch of each draw, else on
    rank 0 alone (the others receive its result)."""
    world = distributed.world_size()
    if world == 1 or data_parallel:
        return _shared_traces(model, block_map, names, draws, config, loss_fn, data_parallel)
    if all(len(d) >= world for d in draws):  # blocks mode, whole draws on every rank: share them out
        shares = [distributed.shard(d) for d in draws]
        return _shared_traces(model, block_map, names, shares, config, loss_fn, data_parallel=True)
    stats = _shared_traces(model, block_map, names, draws, config, loss_fn) if distributed.is_main() else None
    return distributed.broadcast_object(stats)


def estimate_sensitivity(
    model: nn.Module,
    task: Task,
    config: SensitivityConfig = SensitivityConfig(),
    *,
    blocks: Sequence[str] | None = None,
    model_name: str = "model",
    loss_fn: LossFn | None = None,
    resume: SensitivityReport | None = None,
    resume_state: dict | None = None,
    on_block: Callable[[SensitivityReport], None] | None = None,
    on_draw: Callable[[SensitivityReport, dict | None], None] | None = None,
    progress: bool = True,
    block_map: BlockMap | None = None,
) -> SensitivityReport:
    """Run the Q-BERT protocol on every requested block.

    The pending blocks advance together, draw by draw: each draw's batches get one forward and one
    ``create_graph`` backward over all their parameters, and every block's products run through that graph
    (:meth:`BlockHessian.block`; a product costs what it costs through the block's own graph, and the draw pays
    one graph instead of one per block).

    Args:
        model: an HF encoder classifier (fine-tuned); it is switched to eager attention and evaluated with
            dropout off, its train/eval mode restored afterwards.
        task: the tokenized task; draws are sampled from ``task.train``.
        config: protocol settings (see :class:`SensitivityConfig`).
        blocks: block names or groups (default: ``embeddings`` and every encoder layer).
        model_name: how the model is named in the report.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default the model's own loss.
        resume: a partial report of the same model, task and settings; its finished blocks are kept.
        resume_state: the last state ``on_draw`` was given for ``resume`` (its pending blocks' draws so far);
            the run continues from it, with the same numbers as a run never stopped. One of other settings or
            blocks is not used (those blocks start from their first draw).
        on_block: called with the report once blocks are finished (under torch.distributed: on rank 0 only).
        on_draw: called after every draw with the report (its pending blocks unfinished) and the state to
            resume from, plain data and CPU tensors (``torch.save``-able); with ``None`` as the state once the
            blocks are finished. Under torch.distributed pass it on every rank alike; it is called on rank 0.
        progress: show a tqdm bar over blocks x draws (rank 0 only).
        block_map: the model's :class:`~qbert_hessian.models.BlockMap`, when the caller has it.

    Returns:
        The :class:`SensitivityReport`.

    Raises:
        QBHError: unknown blocks, too little data, a non-finite loss, a ``resume`` report that does not
            match these settings, or a parallel mode the ranks cannot share (:func:`parallel_mode`).
    """
    block_map = BlockMap(model) if block_map is None else block_map
    names = block_map.expand(blocks)
    if config.trace == TraceMode.SHARED:
        block_map.check_disjoint(
            names, "trace mode 'shared' needs disjoint blocks, but {a} and {b} overlap; use --trace block"
        )
    indices = draw_indices(len(task.train), config)
    report = SensitivityReport(
        model=block_map.describe(model_name),
        task=task.name,
        config=config.protocol(),
        draws=[{"draw": d, "seed": [config.seed, d], "indices": idx} for d, idx in enumerate(indices)],
        blocks=[],
        pending=list(names),
    )
    if resume is not None:
        _check_resumable(resume, report)
        report.blocks = [b for b in resume.blocks if b.name in names]
        report.seconds = resume.seconds
        done = {b.name for b in report.blocks}
        report.pending = [n for n in names if n not in done]
    todo = list(report.pending)
    world = distributed.world_size()
    mode = parallel_mode(config, len(task.train), len(todo), world) if todo else Parallel.DATA
    data_parallel = world > 1 and mode == Parallel.DATA
    draws = [_draw_batches(task, idx, config.batch_size, shard=data_parallel) for idx in indices]
    main = distributed.is_main()
    # Every rank takes the pending blocks (data) or every world-th of them (blocks), all draw by draw.
    mine = todo[distributed.rank() :: world] if world > 1 and mode == Parallel.BLOCKS else todo
    draws_id = fingerprint([config.protocol(), indices])
    device = next(model.parameters()).device
    first, resumed = _resumed_draws(resume_state if resume is not None else None, todo, draws_id, config.draws, device)
    state = {n: resumed[n] if first else _BlockProgress(_block_generator(config, n)) for n in mine}
    # Whether the states are gathered after every draw: one decision for every rank (the writer is rank 0's).
    saving = on_draw is not None
    if len(mine) < len(todo):
        saving = distributed.broadcast_object(saving)
    bar = tqdm(
        total=len(todo) * config.draws,
        initial=len(todo) * first,
        desc="sensitivity",
        unit="draw",
        disable=not (progress and main),
    )

    def after_draw(d: int) -> None:
        bar.update(len(todo) - len(mine))  # the other ranks' blocks (blocks mode)
        if not saving or d + 1 == config.draws or (len(mine) == len(todo) and not main):
            return  # (data mode: every rank holds the same state; rank 0's is written)
        ours = {n: p.to_state() for n, p in state.items()}
        gathered = distributed.all_gather_objects(ours) if len(mine) < len(todo) else [ours]
        if main and on_draw is not None:
            every = {n: s for part in gathered for n, s in part.items()}
            on_draw(report, {"draws_done": d + 1, "draws_id": draws_id, "blocks": every})

    with curvature_kernels(model), curvature_mode(model), reuse_freed_memory(config.reuse_memory):
        if mine and first < config.draws:
            params = {n: block_map.parameters(n) for n in mine}
            _estimate_blocks(model, params, state, draws, first, config, loss_fn, bar, after_draw, data_parallel)
        if todo:
            finished = [_summarize_block(n, block_map.num_params(n), state[n], config) for n in mine]
            if len(mine) < len(todo):
                finished = [b for part in distributed.all_gather_objects(finished) for b in part]
            for block in finished:
                _warn_unconverged(block, config)
                report.blocks.append(block)
                report.seconds += block.seconds
                report.pending.remove(block.name)
            report.blocks.sort(key=lambda b: names.index(b.name))
            if config.trace != TraceMode.SHARED and main:
                if on_block is not None:
                    on_block(report)
                if on_draw is not None:
                    on_draw(report, None)
        if config.trace == TraceMode.SHARED and todo:
            start = time.perf_counter()
            stats = _shared_traces_spread(model, block_map, names, draws, config, loss_fn, data_parallel)
            for block, s in zip(report.blocks, stats):
                block.trace = s
                block.normalized_trace = s.mean / block.num_params
            report.seconds += time.perf_counter() - start
            if main:
                if on_block is not None:
                    on_block(report)
                if on_draw is not None:
                    on_draw(report, None)
    bar.close()
    return report


def _resumed_draws(
    state: dict | None, todo: Sequence[str], draws_id: str, num_draws: int, device: torch.device
) -> tuple[int, dict[str, _BlockProgress]]:
    """The draws of ``state`` a resumed run keeps (all it holds, when it is of these blocks, draws and settings)
    and each block's progress from it; else (0, {}) and the pending blocks start over (logged)."""
    if not state:
        return 0, {}
    done = state.get("draws_done", 0)
    blocks = state.get("blocks", {})
    if state.get("draws_id") != draws_id or sorted(blocks) != sorted(todo) or not 0 < done < num_draws:
        logger.warning("the saved draws are of other blocks or settings; the pending blocks start over")
        return 0, {}
    try:
        progress = {n: _BlockProgress.from_state(s, device) for n, s in blocks.items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        logger.warning("the saved draws cannot be read (%s); the pending blocks start over", exc)
        return 0, {}
    if any(len(p.eig) != done for p in progress.values()):
        logger.warning("the saved draws are incomplete; the pending blocks start over")
        return 0, {}
    return int(done), progress


def _summarize_block(name: str, num_params: int, out: _BlockProgress, config: SensitivityConfig) -> BlockSensitivity:
    mean, std = _mean_std(out.eig)
    block = BlockSensitivity(
        name=name,
        num_params=num_params,
        eigenvalues=out.eig,
        mean=mean,
        std=std,
        omega=abs(mean) + std,
        iterations=out.iters,
        converged=out.converged,
        seconds=out.seconds,
        top_k=out.top_k if config.top_k > 1 else None,
        most_negative=out.negative or None,
    )
    if out.traces:
        block.trace = _trace_stats(out.traces, TraceMethod(config.trace_method))
        block.normalized_trace = block.trace.mean / num_params
    return block


def _warn_unconverged(block: BlockSensitivity, config: SensitivityConfig) -> None:
    if not all(block.converged):
        logger.warning(
            "%s: the eigen-solver hit max_iters=%d on %d of %d draws",
            block.name,
            config.max_iters,
            block.converged.count(False),
            len(block.converged),
        )


def _trace_stats(traces: list[TraceResult], method: TraceMethod) -> TraceStats:
    """One block's trace over the draws: Hutchinson's samples pooled, Hutch++'s per-draw estimates averaged."""
    if method == TraceMethod.HUTCHPP:
        t = pool_estimates(traces)
    else:
        t = summarize([s for r in traces for s in r.samples])
    products = sum(r.products for r in traces)
    return TraceStats(t.mean, t.stderr if math.isfinite(t.stderr) else 0.0, len(t.samples), method.value, products)


# Settings added after reports were first written, with the value every earlier report was made with.
_ADDED_SETTINGS = {"trace_method": TraceMethod.HUTCHINSON.value, "precision": Precision.FP32.value}


def _check_resumable(old: SensitivityReport, new: SensitivityReport) -> None:
    diffs = []
    if old.task != new.task:
        diffs.append(f"task {old.task!r} vs {new.task!r}")
    for key in ("family", "num_layers", "num_params"):
        if old.model.get(key) != new.model.get(key):
            diffs.append(f"model {key} {old.model.get(key)!r} vs {new.model.get(key)!r}")
    for key in dict.fromkeys([*new.config, *old.config]):  # a setting only one of them records differs too
        before, now = (c.get(key, _ADDED_SETTINGS.get(key)) for c in (old.config, new.config))
        if before != now:
            diffs.append(f"{key} {before!r} vs {now!r}")
    if diffs:
        raise QBHError(
            "cannot resume: the existing report was made with other settings ("
            + "; ".join(diffs[:4])
            + "); rerun with the same settings, or --force to start over"
        )
