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

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .artifacts import PACKED_SCHEMA, BitPlan, read_json, write_json
from .errors import QBHError
from .quant.apply import quant_modules, quantize_model
from .quant.functional import Quantized, code_range
from .quant.modules import ActQuant

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "quantization.json"


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2^bits into bytes, ``bits`` bits each, little-endian within and across bytes.

    ``n`` values take exactly ceil(n * bits / 8) bytes (3-bit codes too).
    """
    values = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return values.copy()
    if values.size and int(values.max()) >= 2**bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    bit_matrix = np.unpackbits(values[:, None], axis=1, bitorder="little")[:, :bits]  # (n, bits)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` values."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return packed[:count].copy()
    bit_matrix = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, :bits] = bit_matrix
    return np.packbits(padded, axis=1, bitorder="little")[:, 0]


def _plan_of(model: nn.Module) -> BitPlan:
    plan = getattr(model, "qbh_plan", None)
    if plan is None:
        raise QBHError("model is not quantized; apply a plan with quantize_model(model, plan) first")
    return BitPlan.from_dict(plan)


def packed_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a packed checkpoint and the manifest's per-weight entries."""
    for name, m in model.named_modules():
        if isinstance(m, ActQuant) and not m.calibrated:
            raise QBHError(f"activation range of {name} is not calibrated; calibrate or train the model first")
    quantized = dict(quant_modules(model))
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for path, module in quantized.items():
        q = module.quantized()
        qmin, _ = code_range(q.bits, module.spec.symmetric)
        unsigned = (q.codes.to(torch.int32) - qmin).to(torch.uint8).numpy()
        key = f"{path}.weight"
        tensors[f"{key}.codes"] = torch.from_numpy(pack_bits(unsigned, q.bits))
        tensors[f"{key}.scale"] = q.scale.half().contiguous()
        if q.zero is not None:
            tensors[f"{key}.zero"] = q.zero.to(torch.uint8).contiguous()
        entries[key] = {
            "block": getattr(module, "qbh_block", None),
            "bits": q.bits,
            "shape": list(q.shape),
            "grid": list(q.grid),
            "groups": module.spec.groups,
            "symmetric": module.spec.symmetric,
            "kind": module.kind,
        }
    for key, t in model.state_dict().items():
        if key not in entries:
            tensors[key] = t.detach().to("cpu").contiguous().clone()
    return tensors, entries


def save_packed(model: nn.Module, out_dir: Path | str, *, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Write the packed checkpoint of a quantized model to ``out_dir`` (atomically: a temporary folder, renamed).

    Returns:
        The path of ``model.safetensors``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    plan = _plan_of(model)
    tensors, entries = packed_tensors(model)
    tmp = out_dir.with_name(out_dir.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "qbert_hessian": PACKED_SCHEMA})
        model.config.save_pretrained(tmp)  # type: ignore[attr-defined]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"  # type: ignore[attr-defined]
        manifest = {"schema": PACKED_SCHEMA, "plan": plan.to_dict(), "attn_implementation": attn, "tensors": entries}
        write_json(tmp / MANIFEST_FILE, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir / WEIGHTS_FILE


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


def load_packed(path: Path | str, *, device: str = "cpu", eager: bool | None = None) -> nn.Module:
    """Rebuild a runnable HF model from a packed checkpoint (quantized modules hold the stored codes).

    Raises:
        QBHError: a folder that is not a packed checkpoint, or a manifest that does not match the model.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    if not is_packed(path):
        raise QBHError(
            f"'{path}' is not a packed checkpoint (no {MANIFEST_FILE}); export one with qbert-hessian quantize"
        )
    manifest = read_json(path / MANIFEST_FILE, PACKED_SCHEMA)
    plan = BitPlan.from_dict(manifest["plan"])
    config = AutoConfig.from_pretrained(path)
    # The attention kernel the model was saved with, unless asked otherwise: eager and SDPA differ in the last
    # float bits, which can flip a borderline prediction.
    attn = manifest.get("attn_implementation", "sdpa") if eager is None else ("eager" if eager else "sdpa")
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)
    model = quantize_model(model, plan, inplace=True)
    _check_manifest(model, manifest["tensors"])
    state = load_file(str(path / WEIGHTS_FILE))
    modules = dict(quant_modules(model))
    for key, e in manifest["tensors"].items():
        module = modules[key.removesuffix(".weight")]
        qmin, _ = code_range(e["bits"], e["symmetric"])
        numel = e["shape"][0] * e["shape"][1]
        codes = torch.from_numpy(unpack_bits(state.pop(f"{key}.codes").numpy(), e["bits"], numel).astype(np.int16))
        scale = state.pop(f"{key}.scale").float()
        zero = state.pop(f"{key}.zero").to(torch.int16) if f"{key}.zero" in state else None
        q = Quantized(
            (codes + qmin).reshape(len(scale), -1), scale, zero, e["bits"], tuple(e["shape"]), tuple(e["grid"])
        )
        module.set_quantized(q)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in manifest["tensors"]]
    if missing or unexpected:
        raise QBHError(
            f"packed checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "re-export it"
        )
    return model.to(device).eval()


def file_sizes(path: Path | str) -> dict[str, int]:
    """Bytes on disk: the weights file and the whole folder."""
    path = Path(path)
    return {
        "weights_bytes": (path / WEIGHTS_FILE).stat().st_size,
        "folder_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
    }


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Bytes of the FP32 model saved as safetensors (measured by writing it to a temporary file)."""
    import tempfile

    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        return os.path.getsize(os.path.join(tmp, WEIGHTS_FILE))


def manifest_summary(path: Path | str) -> dict[str, Any]:
    """The manifest of a packed checkpoint (plan and tensors)."""
    return json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))
