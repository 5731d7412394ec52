"""A packed checkpoint in compressed-tensors' ``pack-quantized`` format, loadable with plain transformers.

``AutoModelFor....from_pretrained(OUT)`` (with ``pip install compressed-tensors``, no qbert_hessian) rebuilds the
model; transformers decompresses the weights to dense float32 on the first forward, so this is the interchange
format, not the fast path (that is ``onnx.py``). The mapping, exact for the weights:

  * one config group per (bits, grid cell shape, symmetric, activation quantization), its ``targets`` the exact
    module names: per-layer widths, 3-bit included (pack-quantized packs 1..8 bits densely in int32 words);
  * ``block`` strategy, ``block_structure`` = (rows, columns) of one of our cells, so per-head column groups,
    row buckets and channels all keep their one scale per cell (``weight_scale`` is the cell grid, float32, in
    which (q - z) * s is computed exactly);
  * symmetric codes as they are ([-2^(b-1), 2^(b-1) - 1] is compressed-tensors' range too); asymmetric codes and
    zero points shifted by -2^(b-1) into that signed range, with the same differences q - z;
  * each quantized linear's static 8-bit input range (``act_range`` max, percentile or mse) as
    ``input_activations`` (``tensor`` strategy, static, ``input_scale`` = amax / 127); per-token dynamic ranges
    (``act_range = dynamic``) as its ``token`` strategy, ``dynamic: true``, which computes the same scales
    (``functional.fake_quantize_activation_dynamic``), so those reload exactly.

Embedding tables are stored as dense float32 holding their dequantized values (exact, but FP32 bytes):
transformers cannot initialise a compressed ``nn.Embedding`` at load (its weight initialisation expects the dense
weight), so only the linears are packed.

One difference, in the activations: our input quantizer clips to [-127, 127] * s (symmetric), compressed-tensors'
int8 range is [-128, 127], so an input below -127.5 * s (beyond the calibrated range, on the negative side)
becomes -128 * s there instead of -127 * s. Weights and every input inside the calibrated range give the same
numbers; plans without activation quantization reload exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..export import load_packed
from ..packed_format import MANIFEST_FILE
from ..quant.apply import quant_modules
from ..quant.modules import QuantLinear
from .layout import ct_pack_int32, signed_codes
from .output import EXPORT_FILE, check_out, check_source, copy_model_files, require, staging

logger = logging.getLogger(__name__)

CT_SCHEMA = "qbert_hessian.compressed_tensors/1"
WEIGHTS_FILE = "model.safetensors"


def _weights_args(bits: int, cell: tuple[int, int], symmetric: bool) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "block",
        "block_structure": list(cell),
        "dynamic": False,
    }


def _input_args(bits: int, dynamic: bool) -> dict[str, Any]:
    strategy = "token" if dynamic else "tensor"
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": dynamic}


def compressed_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a pack-quantized checkpoint of a loaded packed ``model`` and its ``quantization_config``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    groups: dict[tuple, list[str]] = {}
    for path, module in quant_modules(model):
        if not isinstance(module, QuantLinear):
            continue  # the state dict holds the table's dequantized values: transformers cannot build a compressed
            # nn.Embedding (its weight initialisation expects the dense weight)
        q = module.quantized()
        symmetric = module.spec.symmetric
        rows, cols = q.shape
        cell = (rows // q.grid[0], cols // q.grid[1])
        codes = signed_codes(q).numpy()
        state.pop(f"{path}.weight")
        if symmetric:
            signed = codes
        else:
            assert q.zero is not None
            offset = 2 ** (q.bits - 1)
            signed = codes - offset
            # int8 holds z - 2^(b-1) for every width
            state[f"{path}.weight_zero_point"] = (q.zero.to(torch.int32) - offset).reshape(q.grid).to(torch.int8)
        state[f"{path}.weight_packed"] = torch.from_numpy(ct_pack_int32(signed, q.bits))
        state[f"{path}.weight_scale"] = q.scale.float().reshape(q.grid).contiguous()
        state[f"{path}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        act_bits, dynamic = None, False
        if module.act is not None:
            act_bits, dynamic = module.act.bits, module.act.amax is None
        if act_bits is not None and not dynamic:
            amax = state.pop(f"{path}.act.amax").float()
            qmax = 2 ** (act_bits - 1) - 1
            state[f"{path}.input_scale"] = (amax.clamp(min=1e-8) / qmax).reshape(1)
        groups.setdefault((q.bits, cell, symmetric, act_bits, dynamic), []).append(path)
    config_groups = {}
    for i, ((bits, cell, symmetric, act_bits, dynamic), targets) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": sorted(targets),
            "weights": _weights_args(bits, cell, symmetric),
            "input_activations": None if act_bits is None else _input_args(act_bits, dynamic),
            "output_activations": None,
            "format": "pack-quantized",
        }
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
    }
    return state, config


def export_compressed_tensors(packed_dir: Path | str, out_dir: Path | str, *, force: bool = False) -> Path:
    """Write a packed checkpoint as a compressed-tensors ``pack-quantized`` Hugging Face folder.

    Returns:
        The path of ``model.safetensors``.

    Raises:
        QBHError: not a packed checkpoint, ``out_dir`` exists, or compressed-tensors not installed.

    Example:
        >>> export_compressed_tensors("runs/sst2/packed", "runs/sst2/hf")  # doctest: +SKIP
        >>> AutoModelForSequenceClassification.from_pretrained("runs/sst2/hf")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    require("compressed_tensors")
    check_source(packed_dir)
    check_out(out_dir, force=force)
    model = load_packed(packed_dir)
    state, qconfig = compressed_tensors(model)
    with staging(out_dir) as tmp:
        copy_model_files(packed_dir, tmp)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"] = qconfig
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {
            "schema": CT_SCHEMA,
            "format": "compressed-tensors",
            "source": {"packed": str(packed_dir), "manifest": MANIFEST_FILE},
            "weights": {
                t: {"bits": g["weights"]["num_bits"], "block_structure": g["weights"]["block_structure"]}
                for g in qconfig["config_groups"].values()
                for t in g["targets"]
            },
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s (%d config groups)", out_dir / WEIGHTS_FILE, len(qconfig["config_groups"]))
    return out_dir / WEIGHTS_FILE
