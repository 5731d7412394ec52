"""Second-order rounding of a quantized model on calibration data: GPTQ's sequential pass (Frantar et al. 2023).

Every quantized linear layer gets the Hessian of its own inputs, H = 2 X X^T over the real tokens of the
calibration sequences (padding never enters X; every real token weighs the same), and its weights are rounded
onto their fixed grid by :func:`~.gptq.gptq_quantize`. The layers are rounded in order, encoder layer by encoder
layer and inside each in the order the data meets them,

    query, key, value (one input, one Hessian)  ->  attention output  ->  FFN in  ->  FFN out,

so every layer's inputs come through the layers below it already rounded (and compensates their error, as far as
its own weights can). Each encoder layer runs on its recorded inputs only: its inputs for every calibration batch
are recorded once, the layer is rerun for each group of linears, and its outputs become the next layer's inputs.

A layer where GPTQ's sweep would raise the layer-output error on the calibration inputs keeps nearest's codes
(:func:`~.gptq.round_layer`; counted in the log): GPTQ is greedy and can lose on a small or badly conditioned H.

Activations stay in floating point during the pass (their ranges are calibrated after it, on the rounded model).
Embedding tables keep round-to-nearest: a table's input is one-hot, so its Hessian is diagonal and GPTQ's error
feedback is zero; its codes would be nearest's anyway.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import GPTQConfig, check_calib_samples
from ..errors import QBHError
from ..models import BlockMap
from .gptq import InputHessian, round_layer
from .modules import QuantLinear

logger = logging.getLogger(__name__)

# The linears of an encoder layer in the order its data meets them; the parts of one group share their input.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (("query", "key", "value"), ("attn_out",), ("ffn_in",), ("ffn_out",))

Batch = dict[str, Tensor]


class _Recorded(Exception):
    """Raised by the hook that records the first encoder layer's inputs: nothing above it needs to run."""


@contextlib.contextmanager
def _float_activations(model: nn.Module) -> Iterator[None]:
    """Every QuantLinear without its activation quantizer, and the model in eval mode, for the duration."""
    stash = [(m, m.act) for m in model.modules() if isinstance(m, QuantLinear)]
    was_training = model.training
    model.eval()
    try:
        for m, _ in stash:
            m.act = None
        yield
    finally:
        for m, act in stash:
            m.act = act
        model.train(was_training)


def _record_inputs(layer: nn.Module, model: nn.Module, batches: Sequence[Batch], device: Any) -> list[list[Any]]:
    """``[args, kwargs]`` with which ``model`` calls ``layer`` (its first encoder layer) on each batch."""
    calls: list[list[Any]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append([list(args), dict(kwargs)])
        raise _Recorded

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Recorded):
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        handle.remove()
    if len(calls) != len(batches) or not all(c[0] and isinstance(c[0][0], Tensor) for c in calls):
        raise QBHError(
            "could not record the encoder layers' inputs (the first layer was not called with the hidden states "
            "first); second-order rounding supports the BERT, RoBERTa and DistilBERT layer interfaces"
        )
    return calls


def _run_layer(layer: nn.Module, calls: list[list[Any]]) -> list[Tensor]:
    outs = []
    for args, kwargs in calls:
        out = layer(*args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def layer_groups(block_map: BlockMap, index: int) -> list[tuple[str, list[tuple[str, QuantLinear]]]]:
    """The quantized linears of encoder layer ``index``, by :data:`SEQUENTIAL_GROUPS` (groups with none left out):
    ``[(group name, [(block, module), ...]), ...]``."""
    out = []
    for parts in SEQUENTIAL_GROUPS:
        mods = []
        for part in parts:
            block = f"encoder.{index}.{part}"
            module = block_map.model.get_submodule(block_map.module_path(block))
            if isinstance(module, QuantLinear):
                mods.append((block, module))
        if mods:
            out.append(("/".join(parts), mods))
    return out


@torch.no_grad()
def round_gptq_(
    model: nn.Module, batches: Sequence[Batch], config: GPTQConfig = GPTQConfig(), *, progress: bool = False
) -> dict[str, dict[str, Any]]:
    """Round every quantized linear of ``model`` by GPTQ on ``batches``, in place (the modules then hold the codes:
    :meth:`~.modules._QuantWeight.set_rounded`).

    Args:
        model: the output of :func:`~.apply.quantize_model`, no layer rounded yet (its activation ranges need not be
            calibrated: activations stay in floating point during the pass).
        batches: calibration batches as the model takes them, with ``attention_mask`` marking the real tokens.
        config: dampening, act-order and block size (``calib_samples`` is the caller's: it drew ``batches``).
        progress: a progress bar over the encoder layers.

    Returns:
        Per rounded module (canonical block name): ``{"nearest": e_n, "gptq": e_g, "kept": "gptq" | "nearest"}``,
        the layer-output errors tr(dW H dW^T) of nearest rounding and of GPTQ's sweep on the calibration inputs,
        and which codes the module keeps.

    Raises:
        QBHError: no batches, a layer already rounded, inputs that do not match their token masks, or an H that
            stays indefinite after dampening.
    """
    from tqdm.auto import tqdm

    if not batches:
        raise QBHError("second-order rounding got no calibration batches; pass at least one batch of training data")
    block_map = BlockMap(model)
    device = next(model.parameters()).device
    masks = [b["attention_mask"].to(device).bool() if "attention_mask" in b else None for b in batches]
    stats: dict[str, dict[str, Any]] = {}
    with _float_activations(model):
        groups = [layer_groups(block_map, i) for i in range(block_map.num_layers)]
        for block, m in (bm for layer in groups for g in layer for bm in g[1]):
            if m.rounding != "nearest":
                raise QBHError(f"{block} is already rounded by {m.rounding}; round the model quantize_model returned")
        last = max((i for i, g in enumerate(groups) if g), default=-1)
        if last < 0:
            return stats
        calls = _record_inputs(block_map.layers[0], model, batches, device)
        for i in tqdm(range(last + 1), desc="GPTQ rounding", unit="layer", disable=not progress):
            layer = block_map.layers[i]
            for _, mods in groups[i]:
                H = _layer_hessian(layer, mods[0][1], calls, masks)
                for block, m in mods:
                    stats[block] = _round_module(m, H, config)
            if i < last:
                for call, hidden in zip(calls, _run_layer(layer, calls)):
                    call[0][0] = hidden
            if groups[i]:
                mine = [stats[b] for _, mods in groups[i] for b, _ in mods]
                ratio = sum(min(s["gptq"], s["nearest"]) for s in mine) / max(sum(s["nearest"] for s in mine), 1e-30)
                fell_back = [b for _, mods in groups[i] for b, _ in mods if stats[b]["kept"] == "nearest"]
                logger.info(
                    "encoder.%d: layer-output error %.3fx nearest rounding's%s",
                    i,
                    ratio,
                    f" ({', '.join(fell_back)} kept nearest's codes: GPTQ's were worse)" if fell_back else "",
                )
    return stats


def _layer_hessian(layer: nn.Module, module: nn.Module, calls: list[list[Any]], masks: list[Tensor | None]) -> Tensor:
    """H = 2 X X^T / n of ``module``'s inputs over the real tokens of every call of ``layer``."""
    hess = InputHessian(module.in_features, device=module.weight.device)
    current: list[Tensor | None] = [None]

    def hook(_module: nn.Module, args: tuple) -> None:
        hess.add(args[0], current[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        for call, mask in zip(calls, masks):
            current[0] = mask
            layer(*call[0], **call[1])
    finally:
        handle.remove()
    return hess.H


def _round_module(m: QuantLinear, H: Tensor, config: GPTQConfig) -> dict[str, Any]:  # noqa: N803
    """GPTQ codes for ``m`` on its own grid (the nearest rounding's scales), held by the module."""
    nearest = m.quantized()  # the range search's grid, and nearest rounding on it
    r = round_layer(m.weight, H, nearest, damp=config.damp, block_size=config.block_size, act_order=config.act_order)
    m.set_rounded(r.quantized, "gptq")
    return {"nearest": r.error_nearest, "gptq": r.error_gptq, "kept": r.kept}


def calibration_sequences(task: Any, num: int, batch_size: int, seed: int = 0) -> list[Batch]:
    """``num`` seeded training sequences for second-order rounding, in batches of ``batch_size`` similar lengths
    (the padding is excluded from H either way; sorting only saves the work on it).

    Raises:
        QBHError: ``num`` exceeds the training split.
    """
    import numpy as np

    n = len(task.train)
    if n == 0:
        raise QBHError(
            "second-order rounding (gptq) calibrates on training sequences but the task's training "
            "split is empty; give training data (--data), or pass --rounding nearest"
        )
    check_calib_samples(num, n)
    chosen = np.random.default_rng([seed, 25]).permutation(n)[:num].tolist()
    chosen.sort(key=lambda i: (len(task.train[int(i)]["input_ids"]), i))
    return [task.batch("train", chosen[i : i + batch_size]) for i in range(0, len(chosen), batch_size)]
