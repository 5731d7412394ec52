"""A bit plan applied to an HF model: module swap by canonical block name and activation calibration.

The plan speaks in canonical blocks (``encoder.3``, ``encoder.3.query``, ``embeddings.word``); ``models.py``
translates them into module paths, so one plan works for BERT, RoBERTa, DistilBERT and MiniLM alike. A plan
that cannot be honoured (a grouping that does not divide a matrix, a block the model lacks) raises and names
the block; nothing is ever skipped silently.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..artifacts import BitPlan
from ..errors import QBHError
from ..models import BlockMap
from .functional import Kind, QuantSpec, group_layout
from .modules import QUANT_MODULES, ActQuant, QuantEmbedding, QuantLinear
from .ranges import ACT_SAMPLES
from .rounding import calibration_sequences, round_gptq_

if TYPE_CHECKING:
    from ..tasks import Task


def linear_kind(part: str) -> Kind:
    """The grouping kind of a linear part: per-head rows (q/k/v), per-head columns (attn_out) or FFN."""
    return "qkv" if part in ("query", "key", "value") else "attn_out" if part == "attn_out" else "ffn"


@dataclasses.dataclass(frozen=True)
class Target:
    """One module to quantize: its canonical block, module path, kind and weight spec."""

    block: str
    path: str
    kind: Kind
    spec: QuantSpec


def block_modules(block_map: BlockMap, block: str) -> list[tuple[str, str, Kind]]:
    """``(canonical name, module path, kind)`` of every quantizable module inside ``block``
    (:meth:`BlockMap.unit_modules`, with the grouping kind of each)."""
    return [
        (n, p, "embedding" if n.startswith("embeddings.") else linear_kind(n.split(".")[2]))
        for n, p in block_map.unit_modules(block)
    ]


def check_plan_matches(plan: BitPlan, block_map: BlockMap) -> None:
    """Refuse a plan made for a model of another shape."""
    have = block_map.describe("model")
    for key in ("num_layers", "num_heads", "hidden_size"):
        want = plan.model.get(key)
        if want is not None and have.get(key) is not None and int(want) != int(have[key]):
            raise QBHError(
                f"plan was made for another model ({key}={want}, this model has {have[key]}); "
                "make a plan from this model's sensitivity report"
            )


def plan_targets(model: nn.Module, plan: BitPlan, block_map: BlockMap | None = None) -> list[Target]:
    """Resolve a plan into per-module targets; finer blocks override their layer's entry (``block_map``:
    the model's, when the caller has it).

    Raises:
        QBHError: an unknown block, a plan for another model, or a grouping that does not divide a matrix.
    """
    block_map = BlockMap(model) if block_map is None else block_map
    check_plan_matches(plan, block_map)
    heads = block_map.num_heads
    by_path: dict[str, Target] = {}
    # Coarse blocks first, so encoder.3.query overrides encoder.3.
    for block in sorted(plan.blocks, key=lambda b: b.count(".")):
        entry = plan.blocks[block]
        spec = QuantSpec(entry["bits"], entry.get("groups", 1), plan.symmetric, plan.range_method)
        for name, path, kind in block_modules(block_map, block):
            weight = model.get_submodule(path).weight
            shape = (weight.shape[0], weight.shape[1])
            group_layout(shape, spec.groups, kind=kind, num_heads=heads, name=name)  # raises, naming the block
            by_path[path] = Target(name, path, kind, spec)
    return list(by_path.values())


def quantize_model(model: nn.Module, plan: BitPlan, *, inplace: bool = False) -> nn.Module:
    """Swap the plan's Linear/Embedding modules for fake-quant ones (FP32 master weights, trainable), their
    weights rounded to nearest on the plan's grid.

    A plan that says ``rounding = gptq`` (the default) is not finished here: GPTQ needs calibration data, so
    :func:`quantize_calibrated` (the plan applied whole: GPTQ and activation ranges from the task's training
    split) or :func:`~.rounding.round_gptq_` on this model does it; ``save_packed`` refuses the model until then.

    Args:
        model: an HF encoder classifier.
        plan: the bit plan; absent blocks and the classifier head stay FP32.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The quantized model (save it with ``save_packed(model, out, plan=plan)``).
    """
    block_map = BlockMap(model)
    targets = plan_targets(model, plan, block_map)
    if not inplace:
        model = copy.deepcopy(model)
    heads = block_map.num_heads
    for t in targets:
        parent_path, _, attr = t.path.rpartition(".")
        parent, module = model.get_submodule(parent_path), model.get_submodule(t.path)
        if isinstance(module, QUANT_MODULES):
            raise QBHError(f"block {t.block} is already quantized; quantize the FP32 model")
        grid = group_layout(tuple(module.weight.shape), t.spec.groups, kind=t.kind, num_heads=heads, name=t.block)
        if t.kind == "embedding":
            new: nn.Module = QuantEmbedding.from_module(module, t.spec, grid)
        else:
            new = QuantLinear.from_module(module, t.spec, grid, t.kind, plan.act_bits, plan.act_range)
        new.qbh_block = t.block
        setattr(parent, attr, new)
    return model


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantLinear | QuantEmbedding]]:
    """``(module path, module)`` of every fake-quant module."""
    for name, module in model.named_modules():
        if isinstance(module, QUANT_MODULES):
            yield name, module


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, seed: int = 0) -> int:
    """Set the static activation ranges from a few batches (eval mode, no gradients); returns the batch count.

    ``max`` ranges follow their EMA of max|x| batch by batch; ``percentile`` and ``mse`` ranges are chosen at the
    end from the |x| each site saw (at most ``ranges.ACT_SAMPLES`` values per site, drawn with ``seed``);
    ``dynamic`` ones need nothing.
    """
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    batches = list(batches)
    sampled = [m for m in acts if m.range_method in ("percentile", "mse")]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = 0
    try:
        for i, m in enumerate(sampled):
            m.begin_sampling(math.ceil(ACT_SAMPLES / max(1, len(batches))), [seed, i])
        for m in acts:
            m.observing = True
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items()})
            n += 1
        for m in sampled:
            m.end_sampling()
    finally:
        for m in acts:
            m.observing = False
            m._sample = None
        model.train(was_training)
    if acts and n == 0:
        raise QBHError("calibration got no batches; pass at least one batch of training data")
    return n


@torch.no_grad()
def sync_activation_ranges(model: nn.Module) -> int:
    """Average every activation range (``amax``) over the ranks of a torch.distributed job, in place, so every
    rank holds, and would export, the same model; returns the number of ranges (a no-op in one process).

    QAT keeps the ranks' ranges equal already (each update takes the maximum over the ranks' shares of the
    batch, :meth:`~qbert_hessian.quant.modules.ActQuant.observe`); this makes it hold whatever ran before.
    """
    amax = [m.amax for m in model.modules() if isinstance(m, ActQuant) and m.amax is not None]
    world = distributed.world_size()
    if amax and world > 1:
        distributed.all_reduce_(amax)
        for a in amax:
            a.div_(world)
    return len(amax)


def calibration_batches(task: Task, num_batches: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``num_batches`` seeded batches of training examples for :func:`calibrate_activations`."""
    n = len(task.train)
    order = np.random.default_rng([seed, 7]).permutation(n)[: num_batches * batch_size].tolist()
    return [task.batch("train", order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def quantize_calibrated(
    model: nn.Module,
    plan: BitPlan,
    task: Task,
    *,
    num_batches: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """:func:`quantize_model` (a copy); its weights rounded by GPTQ on ``plan.gptq``'s number of seeded training
    sequences when the plan says ``rounding = gptq`` (:mod:`.rounding`); then its activation ranges from seeded
    training batches when the plan quantizes activations: the direct (post-training) quantization every stage
    evaluates and exports. ``seed`` draws both calibration sets."""
    qmodel = quantize_model(model, plan)
    gptq = plan.gptq_config
    if gptq is not None:
        sequences = calibration_sequences(task, gptq.calib_samples, batch_size, seed)
        round_gptq_(qmodel, sequences, gptq, progress=progress)
    if plan.act_bits and plan.act_range != "dynamic":
        calibrate_activations(qmodel, calibration_batches(task, num_batches, batch_size, seed), seed=seed)
    return qmodel
