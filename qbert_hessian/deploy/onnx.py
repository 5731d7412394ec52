"""A packed checkpoint as an ONNX Runtime model: packed 2/4/8-bit weights, int8 kernels (Q8BERT's promise).

The graph is ``torch.onnx.export`` (the TorchScript exporter) of the packed model with each fake-quant module
replaced by a module whose ONNX form is ONNX Runtime's contrib op over the stored codes (``layout.py``):

    QuantLinear      ->  com.microsoft::MatMulNBits(x, B, scales[, zero_points]) (+ bias)
    QuantEmbedding   ->  com.microsoft::GatherBlockQuantized(data, ids, scales[, zero_points])

Two modes:

  * int8 (default): ``accuracy_level`` 4, MatMulNBits quantizes its input to int8 per block on the fly and runs
    the int8 dot-product kernels (VNNI where the CPU has it); no stored activation range is used. That is dynamic
    quantization, a range per token and block of K, finer than the per-token ranges of ``act_range = dynamic`` (the
    default), so a dynamic plan is served as it was scored; a static plan's ranges (max, percentile, mse) are not.
  * exact (``--exact``): ``accuracy_level`` 1 (float32 compute over the exactly dequantized weights) and each
    quantized linear's static 8-bit input range as Clip -> QuantizeLinear -> DequantizeLinear, which is the
    fake-quantized model's own arithmetic: its logits match ``load_packed``'s up to float summation order.
    Per-token dynamic ranges (``act_range = dynamic``) are written as the same float operations the fake-quantized
    model runs: s = ReduceMax(Abs(x), last axis) / ((2^b - 1) / 2) (0 -> eps), then
    Mul(Clip(Round(x / s), -2^(b-1), 2^(b-1) - 1), s).

Written Hugging Face-style: ``OUT/onnx/model.onnx`` beside ``config.json`` and the tokenizer, and
``OUT/export.json`` recording the mode, inputs, outputs and each weight's stored width and block.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..artifacts import sha256_file
from ..errors import QBHError
from ..export import load_packed
from ..models import head_family, load_tokenizer
from ..packed_format import MANIFEST_FILE
from ..quant.apply import quant_modules
from ..quant.functional import fake_quantize_activation, fake_quantize_activation_dynamic
from ..quant.modules import QuantEmbedding, QuantLinear
from .layout import block_size, onnx_bits, to_nbits
from .output import EXPORT_FILE, check_out, check_source, copy_model_files, require, staging

logger = logging.getLogger(__name__)

ONNX_SCHEMA = "qbert_hessian.onnx/1"
ONNX_FILE = "onnx/model.onnx"
OPSET = 17
INT8_ACCURACY, EXACT_ACCURACY = 4, 1
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _const(g: Any, value: float | int, dtype: torch.dtype = torch.float32) -> Any:
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _typed(y: Any, leading: list[int | None] | None, width: int, like: Any) -> Any:
    """Give a contrib op's output ``like``'s dtype and the shape (*leading, width): the exporter cannot infer
    either for ops outside the standard domain."""
    if leading is not None:
        y.setType(like.type().with_sizes([*leading, width]))
    return y


class _MatMulNBits(torch.autograd.Function):
    """x @ W.T in torch (for tracing); MatMulNBits over the packed codes in ONNX."""

    @staticmethod
    def forward(ctx, x, weight, data, scales, zero_points, meta):  # noqa: ANN001, ARG004
        if meta["act"] == "dynamic":
            x = fake_quantize_activation_dynamic(x, meta["act_bits"])
        elif meta["act"] is not None:
            x = fake_quantize_activation(x, torch.tensor(meta["act"][0]), meta["act"][2])
        return x @ weight.t()

    @staticmethod
    def symbolic(g, x, weight, data, scales, zero_points, meta):  # noqa: ANN001, ARG004
        if meta["act"] == "dynamic":  # exact mode: a range per token, the fake-quantized model's float ops
            b = meta["act_bits"]
            amax = g.op("ReduceMax", g.op("Abs", x), axes_i=[-1], keepdims_i=1)
            s = g.op("Div", amax, _const(g, (2**b - 1) / 2))
            eps = _const(g, torch.finfo(torch.float32).eps)
            s = g.op("Where", g.op("Equal", s, _const(g, 0.0)), eps, s)
            q = g.op(
                "Clip", g.op("Round", g.op("Div", x, s)), _const(g, -(2.0 ** (b - 1))), _const(g, 2.0 ** (b - 1) - 1)
            )
            x = g.op("Mul", q, s)
        elif meta["act"] is not None:  # exact mode: the static input range, as the fake-quantized model applies it
            amax, scale, _ = meta["act"]
            zero = _const(g, 0, torch.int8)
            x = g.op("Clip", x, _const(g, -amax), _const(g, amax))
            q = g.op("QuantizeLinear", x, _const(g, scale), zero)
            x = g.op("DequantizeLinear", q, _const(g, scale), zero)
        inputs = [x, data, scales] + ([] if zero_points is None else [zero_points])
        attrs = {k: meta[k] for k in ("K", "N", "bits", "block_size", "accuracy_level")}
        y = g.op("com.microsoft::MatMulNBits", *inputs, **{f"{k}_i": v for k, v in attrs.items()})
        sizes = x.type().varyingSizes()
        return _typed(y, None if sizes is None else sizes[:-1], meta["N"], x)


class _GatherBlockQuantized(torch.autograd.Function):
    """Rows of the dequantized table in torch; GatherBlockQuantized over the packed codes in ONNX."""

    @staticmethod
    def forward(ctx, ids, weight, data, scales, zero_points, meta):  # noqa: ANN001, ARG004
        return weight[ids]

    @staticmethod
    def symbolic(g, ids, weight, data, scales, zero_points, meta):  # noqa: ANN001, ARG004
        inputs = [data, ids, scales] + ([] if zero_points is None else [zero_points])
        y = g.op(
            "com.microsoft::GatherBlockQuantized",
            *inputs,
            bits_i=meta["bits"],
            block_size_i=meta["block_size"],
            gather_axis_i=0,
            quantize_axis_i=1,
        )
        return _typed(y, ids.type().varyingSizes(), meta["K"], scales)


class _Packed(nn.Module):
    """A quantized module's stored codes in ONNX Runtime's layout, and its dequantized weight for tracing."""

    def __init__(self, module: QuantLinear | QuantEmbedding, name: str, *, accuracy_level: int, exact: bool) -> None:
        super().__init__()
        q = module.quantized()
        symmetric = module.spec.symmetric
        bits = onnx_bits(q.bits)
        is_embedding = isinstance(module, QuantEmbedding)
        rows, cols = q.shape
        block = block_size(cols, q.grid[1], bits, symmetric=symmetric, name=name, tile=is_embedding)
        nb = to_nbits(q, symmetric=symmetric, bits=bits, block=block)
        self.is_embedding = is_embedding
        self.register_buffer("weight", q.dequantize())
        data = torch.from_numpy(nb.data)
        self.register_buffer("data", data.reshape(rows, -1) if is_embedding else data)
        scales = torch.from_numpy(nb.scales)
        self.register_buffer("scales", scales if is_embedding else scales.reshape(-1))
        zp = None if nb.zero_points is None else torch.from_numpy(nb.zero_points)
        self.register_buffer("zero_points", zp if zp is None or is_embedding else zp.reshape(-1))
        self.bias = None if is_embedding else module.bias
        act = None
        act_bits = None if is_embedding or module.act is None else module.act.bits
        if act_bits is not None and act_bits > 8 and exact and module.act.amax is not None:
            raise QBHError(
                f"{name}: its activations are {act_bits}-bit, and --exact writes them as int8 "
                "Quantize/DequantizeLinear; "
                "plan with activations of at most 8 bits (--act-bits 8)"
            )
        if act_bits is not None and act_bits != 8 and not exact:
            raise QBHError(
                f"{name}: its activations are {act_bits}-bit, and int8 compute quantizes them to 8 bits on the fly; "
                "export with --exact, or plan with 8-bit activations (--act-bits 8)"
            )
        if exact and act_bits is not None and module.act.amax is None:
            act = "dynamic"
        elif exact and act_bits is not None:
            amax = module.act.amax.float()
            qmax = 2 ** (module.act.bits - 1) - 1
            act = (float(amax), float(amax.clamp(min=1e-8) / qmax), module.act.bits)
        self.meta = {"K": cols, "N": rows, "bits": bits, "block_size": block, "accuracy_level": accuracy_level}
        self.meta["act"], self.meta["act_bits"] = act, act_bits
        self.record = {"bits": q.bits, "stored_bits": bits, "block_size": block, "grid": list(q.grid)}
        self.record["op"] = "GatherBlockQuantized" if is_embedding else "MatMulNBits"

    def forward(self, x: Tensor) -> Tensor:
        fn = _GatherBlockQuantized if self.is_embedding else _MatMulNBits
        y = fn.apply(x, self.weight, self.data, self.scales, self.zero_points, self.meta)
        return y if self.bias is None else y + self.bias


class _Outputs(nn.Module):
    """The HF model as a function of positional input tensors, returning its logits (QA: start and end)."""

    def __init__(self, model: nn.Module, inputs: tuple[str, ...], family: str) -> None:
        super().__init__()
        self.model, self.inputs, self.family = model, inputs, family

    def forward(self, *args: Tensor) -> Any:
        out = self.model(**dict(zip(self.inputs, args)))
        return (out.start_logits, out.end_logits) if self.family == "qa" else out.logits


def output_names(family: str) -> tuple[str, ...]:
    return ("start_logits", "end_logits") if family == "qa" else ("logits",)


def _swap(model: nn.Module, *, accuracy_level: int, exact: bool) -> dict[str, dict[str, Any]]:
    records = {}
    for path, module in list(quant_modules(model)):
        parent_path, _, attr = path.rpartition(".")
        packed = _Packed(module, getattr(module, "qbh_block", None) or path, accuracy_level=accuracy_level, exact=exact)
        if isinstance(module, QuantEmbedding):
            packed.padding_idx = module.padding_idx
        setattr(model.get_submodule(parent_path), attr, packed)
        records[f"{path}.weight"] = dict(packed.record, block=getattr(module, "qbh_block", None))
    return records


def _dummy_inputs(inputs: tuple[str, ...], vocab_size: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(values[name] for name in inputs)


def export_onnx(packed_dir: Path | str, out_dir: Path | str, *, exact: bool = False, force: bool = False) -> Path:
    """Write the ONNX Runtime form of a packed checkpoint.

    Args:
        packed_dir: a folder written by ``qbert-hessian quantize`` (``save_packed``).
        out_dir: the folder to write: ``onnx/model.onnx``, ``config.json``, the tokenizer and ``export.json``.
        exact: float32 compute with the plan's own activation ranges (static ones as Q/DQ, dynamic ones per
            token), the fake-quantized model's numbers, instead of int8 compute.
        force: replace an earlier export in ``out_dir``.

    Returns:
        The path of ``model.onnx``.

    Raises:
        QBHError: not a packed checkpoint, ``out_dir`` exists, onnx/onnxruntime not installed, or a weight whose
            groups ONNX Runtime's blocks cannot follow.

    Example:
        >>> export_onnx("runs/sst2/packed", "runs/sst2/deploy")  # doctest: +SKIP
    """
    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    require("onnx", "onnxruntime")
    check_source(packed_dir)
    check_out(out_dir, force=force)
    model = load_packed(packed_dir, eager=True)  # eager attention traces to plain MatMul/Softmax
    family = head_family(model.config.architectures) or "classification"
    tokenizer = load_tokenizer(str(packed_dir))
    forward_args = set(inspect.signature(model.forward).parameters)
    inputs = tuple(n for n in MODEL_INPUTS if n in tokenizer.model_input_names and n in forward_args)
    accuracy = EXACT_ACCURACY if exact else INT8_ACCURACY
    records = _swap(model, accuracy_level=accuracy, exact=exact)
    outputs = output_names(family)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in (*inputs, *outputs)}
    with staging(out_dir) as tmp:
        (tmp / "onnx").mkdir()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                _Outputs(model, inputs, family).eval(),
                _dummy_inputs(inputs, model.config.vocab_size),
                str(tmp / ONNX_FILE),
                dynamo=False,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=dynamic,
                opset_version=OPSET,
            )
        copy_model_files(packed_dir, tmp)
        meta = {
            "schema": ONNX_SCHEMA,
            "format": "onnx",
            "model": ONNX_FILE,
            "mode": "exact" if exact else "int8",
            "accuracy_level": accuracy,
            "family": family,
            "inputs": list(inputs),
            "outputs": list(outputs),
            "opset": OPSET,
            "source": {"packed": str(packed_dir), "manifest_sha256": sha256_file(packed_dir / MANIFEST_FILE)},
            "weights": records,
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _check_loads(tmp / ONNX_FILE)
    logger.info("wrote %s (%d quantized weights, %s mode)", out_dir / ONNX_FILE, len(records), meta["mode"])
    return out_dir / ONNX_FILE


def _check_loads(path: Path) -> None:
    """ONNX Runtime must accept the file before it is published (a kernel missing for a width, a bad layout)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  (onnxruntime raises its own exception types)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise QBHError(
            f"ONNX Runtime {ort.__version__} cannot load the exported graph ({first}); upgrade onnxruntime"
        ) from None
