"""Packed checkpoints: integer codes bit-packed at their width, fp16 scales, everything else FP32, in safetensors.

Layout of a packed folder (optimum-quanto's state-dict-plus-map design, without pickle):

    config.json, tokenizer files    the HF files, so the architecture is rebuilt offline
    model.safetensors               FP32 tensors as they are; per quantized weight W of module m:
                                    "m.weight.codes" (uint8, b-bit codes packed little-endian, 8/b per byte),
                                    "m.weight.scale" (float16, one per group), "m.weight.zero" (asymmetric)
    quantization.json               {"schema": "qbert_hessian.packed/1", "plan": {...}, "tensors": {...}}

``load_packed`` rebuilds the HF model from ``config.json``, applies the plan's fake-quant modules and hands
each the stored codes and scales, so its logits equal the fake-quantized model's exactly.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .artifacts import BitPlan, PackedManifest, publish, replace_folder
from .errors import QBHError
from .models import TOKENIZER_FILES, auto_model_class, head_family
from .packed_format import (
    MANIFEST_FILE,
    METADATA,
    WEIGHTS_FILE,
    TensorSpec,
    codes_key,
    file_bytes,
    pack_bits,
    packed_bytes,
    scale_key,
    unpack_bits,
    zero_key,
)
from .quant.apply import quant_modules, quantize_model
from .quant.functional import Quantized, code_range
from .quant.modules import SCALE_PARAM, ActQuant
from .quant.profile import state_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "save_packed",
    "load_packed",
    "is_packed",
    "file_sizes",
    "fp32_safetensors_bytes",
    "pack_bits",
    "unpack_bits",
]


def packed_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a packed checkpoint and the manifest's per-weight entries."""
    for name, m in model.named_modules():
        if isinstance(m, ActQuant) and not m.calibrated:
            raise QBHError(f"activation range of {name} is not calibrated; calibrate or train the model first")
    quantized = dict(quant_modules(model))
    if not quantized:
        raise QBHError("model is not quantized; apply a plan with quantize_model(model, plan) first")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for path, module in quantized.items():
        q = module.quantized()
        qmin, _ = code_range(q.bits, module.spec.symmetric)
        unsigned = (q.codes.to(torch.int32) - qmin).to(torch.uint8).cpu().numpy()
        key = f"{path}.weight"
        tensors[codes_key(key)] = torch.from_numpy(pack_bits(unsigned, q.bits))
        tensors[scale_key(key)] = q.scale.half().cpu().contiguous()
        if q.zero is not None:
            tensors[zero_key(key)] = q.zero.to(torch.uint8).cpu().contiguous()
        entries[key] = {
            "block": getattr(module, "qbh_block", None),
            "bits": q.bits,
            "shape": list(q.shape),
            "grid": list(q.grid),
            "groups": module.spec.groups,
            "symmetric": module.spec.symmetric,
            "kind": module.kind,
            "range_method": module.spec.range_method,  # how the range was chosen, or initialised when learned
            "learned_scale": module.weight_scale is not None,  # LSQ: the scale is the trained step
            "rounding": module.rounding,  # how the codes were chosen (before any training): nearest or gptq
        }
    learned = {f"{path}.{SCALE_PARAM}" for path in quantized}  # stored above as the fp16 ".weight.scale"
    for key, t in model.state_dict().items():
        if key not in entries and key not in learned:
            tensors[key] = t.detach().to("cpu").contiguous().clone()
    return tensors, entries


def save_packed(
    model: nn.Module, out_dir: Path | str, *, plan: BitPlan, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Write the packed checkpoint of a quantized model to ``out_dir`` (atomically: a temporary folder, renamed).

    Args:
        model: the output of :func:`~qbert_hessian.quant.apply.quantize_model`, activation ranges calibrated; on
            any device.
        out_dir: the folder to write; an existing packed checkpoint there is replaced, anything else is refused.
        plan: the plan the model was quantized with (stored in the manifest, so the folder describes itself).
        tokenizer: saved beside the weights, so the folder loads alone.

    Returns:
        The path of ``model.safetensors``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not isinstance(plan, BitPlan):
        raise QBHError("save_packed needs plan=BitPlan (the plan the model was quantized with)")
    if out_dir.exists() and not is_packed(out_dir):
        raise QBHError(f"'{out_dir}' exists and is not a packed checkpoint; choose a new folder for --out")
    tensors, entries = packed_tensors(model)
    for key, e in entries.items():
        if (e["range_method"], e["symmetric"]) != (plan.range_method, plan.symmetric):
            raise QBHError(
                f"{key} was quantized with {e['range_method']} {'symmetric' if e['symmetric'] else 'asymmetric'} "
                f"ranges, the plan says {plan.range_method} {'symmetric' if plan.symmetric else 'asymmetric'}; "
                "pass the plan the model was quantized with"
            )
        if e["kind"] != "embedding" and e["rounding"] != plan.rounding:  # tables always round to nearest
            if (e["rounding"], plan.rounding) == ("nearest", "gptq"):  # quantize_model alone, on a GPTQ plan
                raise QBHError(
                    f"{key} was rounded to nearest, the plan says gptq; apply the plan with quantize_calibrated"
                    "(model, plan, task) (GPTQ on the task's training data), or make the plan with rounding nearest"
                )
            raise QBHError(
                f"{key} was rounded by {e['rounding']}, the plan says {plan.rounding}; pass the plan the model was "
                "quantized with"
            )
    for name, m in model.named_modules():
        if isinstance(m, ActQuant) and m.range_method != plan.act_range:
            raise QBHError(
                f"{name.removesuffix('.act')}'s input range was set by {m.range_method}, the plan says "
                f"{plan.act_range}; pass the plan the model was quantized with"
            )
    tmp = out_dir.with_name(out_dir.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=METADATA)
        model.config.architectures = [type(model).__name__]  # type: ignore[attr-defined]  (load_packed's head)
        model.config.save_pretrained(tmp)  # type: ignore[attr-defined]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"  # type: ignore[attr-defined]
        manifest = PackedManifest(plan=plan, attn_implementation=attn, tensors=entries)
        manifest.sha256 = manifest.digest(tmp / WEIGHTS_FILE)
        manifest.save(tmp / MANIFEST_FILE)
        publish(tmp)
        _replace_folder(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir / WEIGHTS_FILE


# What a packed folder's writers put there: save_packed (weights, manifest, HF config, tokenizer files) and the
# size report beside it. Anything else in a folder being replaced is a person's own and is kept.
WRITTEN_FILES = frozenset(
    {WEIGHTS_FILE, MANIFEST_FILE, "config.json", "generation_config.json", "size.json", *TOKENIZER_FILES}
    | {"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja"}
)


def _replace_folder(new: Path, out_dir: Path) -> None:
    """Put the finished packed folder ``new`` at ``out_dir``, keeping what no writer of a packed folder makes."""
    replace_folder(new, out_dir, lambda name: name in WRITTEN_FILES)


def is_packed(path: Path | str) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def _check_manifest(model: nn.Module, entries: dict[str, Any]) -> None:
    have = {f"{p}.weight": m for p, m in quant_modules(model)}
    problems = [f"{k} missing from the checkpoint" for k in have if k not in entries]
    problems += [f"{k} is not quantized by the plan" for k in entries if k not in have]
    for k, m in have.items():
        e = entries.get(k)
        if e and (list(m.weight.shape) != e["shape"] or m.spec.bits != e["bits"] or list(m.grid) != e["grid"]):
            problems.append(
                f"{k}: checkpoint has {e['bits']} bits {e['shape']} grid {e['grid']}, model expects "
                f"{m.spec.bits} bits {list(m.weight.shape)} grid {list(m.grid)}"
            )
    if problems:
        raise QBHError(f"packed checkpoint does not match its model: {'; '.join(problems[:3])}; re-export it")


def _check_settings(path: Path, manifest: PackedManifest) -> None:
    """Every weight's settings in the manifest agree with its plan's (checked for folders written before
    checksums too), and the weights file exists."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise QBHError(f"'{weights}' does not exist; re-export the packed checkpoint (qbert-hessian quantize)")
    plan = manifest.plan
    for key, e in manifest.tensors.items():
        if not isinstance(e, dict) or any(k not in e for k in ("bits", "shape", "grid", "symmetric")):
            raise QBHError(f"'{path / MANIFEST_FILE}': the entry of {key} is incomplete; re-export the checkpoint")
        if e["symmetric"] != plan.symmetric or e.get("range_method", plan.range_method) != plan.range_method:
            raise QBHError(
                f"'{path / MANIFEST_FILE}' contradicts itself: {key} is stored "
                f"{'symmetric' if e['symmetric'] else 'asymmetric'} with {e.get('range_method')} ranges, its plan "
                f"says {'symmetric' if plan.symmetric else 'asymmetric'} with {plan.range_method}; re-export it"
            )


def _check_checksum(path: Path, manifest: PackedManifest) -> None:
    """The weights file and the manifest are the ones written together (:meth:`PackedManifest.digest`)."""
    # Written before checksums (sha256 None): still loaded (re-exporting a run's QAT model means retraining it),
    # with every size, scale and setting checked; only a code changed in place, at the right length, would go
    # unseen. load_packed says so once the folder has passed those checks.
    if manifest.sha256 is not None and manifest.digest(path / WEIGHTS_FILE) != manifest.sha256:
        raise QBHError(
            f"packed checkpoint '{path}' is damaged or was edited: {WEIGHTS_FILE} and {MANIFEST_FILE} do not match "
            "the checksum recorded when they were written; re-export it (qbert-hessian quantize)"
        )


def _stored_weight(state: dict[str, torch.Tensor], key: str, e: dict[str, Any]) -> Quantized:
    """The codes, scales (and zeros) of the weight ``key`` from the loaded tensors, every size checked exactly
    against the manifest's shape, bits and grid (unpacking a short buffer would zero-fill it), the scales finite
    and positive, the zero points on the code grid."""
    bits, shape, grid, symmetric = e["bits"], tuple(e["shape"]), tuple(e["grid"]), e["symmetric"]
    numel, num_groups = math.prod(shape), math.prod(grid)
    fix = "re-export the packed checkpoint (qbert-hessian quantize)"
    stored = {k: state.pop(k, None) for k in (codes_key(key), scale_key(key), zero_key(key))}
    packed, scale, zero = stored.values()
    if packed is None or scale is None:
        raise QBHError(f"packed tensors of {key} are missing; {fix}")
    if (zero is None) != symmetric:
        what = "has zero points" if zero is not None else "has no zero points"
        raise QBHError(f"{key} {what} but the manifest says {'' if symmetric else 'a'}symmetric; {fix}")
    expect = {"codes": ((packed_bytes(numel, bits),), torch.uint8), "scale": ((num_groups,), torch.float16)}
    if zero is not None:
        expect["zero"] = ((num_groups,), torch.uint8)
    for part, t in (("codes", packed), ("scale", scale), ("zero", zero)):
        if part in expect and (tuple(t.shape), t.dtype) != expect[part]:
            size, dtype = expect[part]
            raise QBHError(
                f"{key}.{part} has shape {list(t.shape)} {t.dtype}, the manifest's {bits} bits x {list(shape)} in "
                f"grid {list(grid)} needs {list(size)} {dtype}; the file is truncated or edited: {fix}"
            )
    scale = scale.float()
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        bad = scale[~(torch.isfinite(scale) & (scale > 0))][0].item()
        raise QBHError(f"{key}.scale holds {bad}: scales must be finite and positive; {fix}")
    qmin, qmax = code_range(bits, symmetric)
    if zero is not None and int(zero.max()) > qmax - qmin:
        raise QBHError(f"{key}.zero holds {int(zero.max())}, off the {bits}-bit grid; {fix}")
    codes = torch.from_numpy(unpack_bits(packed.numpy(), bits, numel).astype(np.int16))
    zero16 = zero.to(torch.int16) if zero is not None else None
    return Quantized((codes + qmin).reshape(num_groups, -1), scale, zero16, bits, shape, grid)  # type: ignore[arg-type]


def load_packed(path: Path | str, *, device: str = "cpu", eager: bool | None = None) -> nn.Module:
    """Rebuild a runnable HF model from a packed checkpoint (quantized modules hold the stored codes).

    Raises:
        QBHError: a folder that is not a packed checkpoint, or a manifest that does not match the model.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    if not is_packed(path):
        raise QBHError(
            f"'{path}' is not a packed checkpoint (no {MANIFEST_FILE}); export one with qbert-hessian quantize"
        )
    manifest = PackedManifest.load(path / MANIFEST_FILE)
    _check_settings(path, manifest)
    plan = manifest.plan
    config = AutoConfig.from_pretrained(path)
    # The attention kernel the model was saved with, unless asked otherwise: eager and SDPA differ in the last
    # float bits, which can flip a borderline prediction.
    attn = manifest.attn_implementation if eager is None else ("eager" if eager else "sdpa")
    auto = auto_model_class(head_family(config.architectures) or "classification")  # the head it was saved with
    model = auto.from_config(config, attn_implementation=attn)
    model = quantize_model(model, plan, inplace=True)
    _check_manifest(model, manifest.tensors)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types for a damaged file)
        raise QBHError(f"'{path / WEIGHTS_FILE}' cannot be read ({exc}); re-export the packed checkpoint") from None
    _check_checksum(path, manifest)
    modules = dict(quant_modules(model))
    for key, e in manifest.tensors.items():
        module = modules[key.removesuffix(".weight")]
        q = _stored_weight(state, key, e)
        if e.get("rounding", "nearest") == "nearest":  # manifests written before roundings: nearest
            module.set_quantized(q)
        else:  # the grid the codes were chosen on is held too, so training on from here keeps it
            module.set_rounded(q, e["rounding"])
    for name, t in state.items():  # the FP32 weights and activation ranges
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise QBHError(f"'{path / WEIGHTS_FILE}': {name} holds NaN or inf; re-export the packed checkpoint")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in manifest.tensors]
    if missing or unexpected:
        raise QBHError(
            f"packed checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "re-export it"
        )
    if manifest.sha256 is None:
        logger.warning("'%s' records no checksum (written by an older version); re-export it to add one", path)
    return model.to(device).eval()


def file_sizes(path: Path | str) -> dict[str, int]:
    """Bytes on disk: the weights file and the whole folder."""
    path = Path(path)
    return {
        "weights_bytes": (path / WEIGHTS_FILE).stat().st_size,
        "folder_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
    }


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Bytes of the FP32 model's state dict saved as safetensors (``save_pretrained``'s file), computed exactly."""
    return file_bytes([TensorSpec(n, d, tuple(s)) for n, d, s in state_tensors(model)], {"format": "pt"})
