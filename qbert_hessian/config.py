"""Frozen configuration dataclasses, one per stage, with defaults that reproduce the papers.

Each is validated in ``__post_init__`` (a :class:`QBHError`, never an ``assert``), maps one-to-one onto the
CLI flags, and round-trips through ``to_dict`` / ``from_dict``; ``from_dict`` refuses unknown keys and
lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping
from enum import Enum
from typing import Any, Literal, TypeVar

from .errors import QBHError

C = TypeVar("C", bound="_Config")
Groups = int | str  # 1, an integer G, "heads" or "channel"
MIN_BITS, MAX_BITS = 2, 8
GROUP_WORDS = ("heads", "channel")


def parse_groups(value: object) -> Groups:
    """``1``, ``"128"``, ``128``, ``"heads"``, ``"channel"`` -> the canonical grouping (int or word)."""
    if isinstance(value, str) and value.strip().lower() in GROUP_WORDS:
        return value.strip().lower()
    try:
        g = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        g = 0
    if g < 1 or (isinstance(value, float) and value != g):
        raise QBHError(f"groups '{value}' is not valid; use 1, a positive integer G, heads or channel")
    return g


Kind = Literal["qkv", "attn_out", "ffn", "embedding"]  # how a matrix is grouped (``group_layout``)


def group_layout(
    shape: tuple[int, int], groups: Groups, *, kind: Kind, num_heads: int | None = None, name: str = "weight"
) -> tuple[int, int]:
    """The ``(row_groups, col_groups)`` grid of a weight of ``shape`` (out, in) under ``groups``: one scale per
    cell (``quant/functional.py`` rounds on it). It follows from the shape alone, so the allocator sizes a matrix
    under any grouping without torch.

    Example: query (384, 384), 12 heads, ``heads`` -> (12, 1); attention output -> (1, 12); ``128`` -> (128, 1);
    ``channel`` -> (384, 1); an embedding table (30522, 384) under ``channel`` -> (30522, 1).

    Raises:
        QBHError: the grouping does not divide the matrix, or ``heads`` without heads.
    """
    out_f, in_f = shape
    groups = parse_groups(groups)
    if groups == "channel":
        return out_f, 1
    if groups == "heads":
        if kind == "embedding" or not num_heads:
            raise QBHError(f"{name}: groups 'heads' needs attention heads; use 1, an integer or channel")
        grid = (1, num_heads) if kind == "attn_out" else (num_heads, 1)
    elif kind == "attn_out" and num_heads and groups % num_heads == 0 and groups > 1:
        grid = (groups // num_heads, num_heads)
    else:
        grid = (int(groups), 1)
    if out_f % grid[0] or in_f % grid[1]:
        fix = (
            f"a divisor of its {out_f} rows or channel"
            if kind == "embedding"
            else "a divisor of the matrix size, heads or channel"
        )
        raise QBHError(
            f"{name}: groups={groups} do not divide its {out_f}x{in_f} weight into a {grid[0]}x{grid[1]} grid; "
            f"choose {fix}"
        )
    return grid


BIT_RANGES = {"weight": (2, 8), "embedding": (2, 8), "activation": (2, 16)}
# How a group's quantization range is chosen (``quant/ranges.py``): its max, or the MSE-best clipped range.
RANGE_METHODS = ("max", "mse")
# The range method of new profiles and plans (MiniLM-L6: mse has 0.28/0.34/0.48 of max's error at 2/3/4 bits).
DEFAULT_RANGE_METHOD = "mse"


def check_range_method(value: object, what: str = "range method") -> str:
    """``value`` if it names a range method, else a :class:`QBHError` naming the valid ones."""
    if not isinstance(value, str) or value not in RANGE_METHODS:
        raise QBHError(f"{what} {value!r} is not known; use one of {', '.join(RANGE_METHODS)}")
    return value


# How each weight rounds onto its grid (the grid itself comes from the range method either way): to its nearest
# level, or by second-order rounding on calibration inputs (GPTQ, ``quant/gptq.py``). GPTQ is the default: on
# CoNLL-03 (MiniLM-L6) it beat nearest at every width of 4 bits or fewer with no training (3-bit -1.6 against -5.7
# F1, mixed 2/3 -2.2 against -13.7) for about 15 s of calibration, and keeps nearest's codes for a layer it would
# make worse.
ROUNDINGS = ("nearest", "gptq")
DEFAULT_ROUNDING = "gptq"


def check_rounding(value: object, what: str = "rounding") -> str:
    """``value`` if it names a rounding, else a :class:`QBHError` naming the valid ones."""
    if not isinstance(value, str) or value not in ROUNDINGS:
        raise QBHError(f"{what} {value!r} is not known; use one of {', '.join(ROUNDINGS)}")
    return value


# How each quantized linear's 8-bit input range is set (``quant/ranges.py``, ``quant/modules.py``): ``max`` an
# EMA of max|x| (Q8BERT), ``percentile`` the ACT_PERCENTILE-th percentile of |x| and ``mse`` the clipping of least
# squared quantization error (both static, from the calibration batches), ``dynamic`` a range per token computed at
# run time (ZeroQuant; nothing stored). Dynamic is the default: on SQuAD (MiniLM-L6) 8-bit weights and activations
# lost 1.3 F1 with max's static ranges and 0.15 with dynamic ones; on CoNLL-03 the two tie. It is what int8 runtimes
# do (ONNX Runtime's int8 kernels quantize their input per block as they run), and it needs no calibration batches.
ACT_RANGES = ("max", "percentile", "mse", "dynamic")
DEFAULT_ACT_RANGE = "dynamic"
ACT_PERCENTILE = 99.99  # one value of |x| in 10^4 is clipped

# What a plan, run cache or results row that does not record one of these settings was computed with: each was
# left out of the records while it had this value (so records made before it was a setting still match). These
# are history, not defaults: a default may move (rounding did, from nearest to gptq; act_range from max to dynamic),
# and a record without the key must still be read as this value, so code that leaves a setting out of a record, or
# reads one back, compares with these, never with the dataclass's current default.
UNRECORDED = types.MappingProxyType({"rounding": "nearest", "calib_samples": 128, "damp": 0.01, "act_range": "max"})


def without_unrecorded(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as a record holds them: those at their :data:`UNRECORDED` value left out, the others kept in
    order. The one place of that rule, for :meth:`AllocConfig.protocol` and a plan's stage inputs in the pipeline.

    Example:
        ``without_unrecorded({"rounding": "nearest", "bits": 4}) == {"bits": 4}``
    """
    return {k: v for k, v in settings.items() if k not in UNRECORDED or v != UNRECORDED[k]}


def check_act_range(value: object, what: str = "activation range") -> str:
    """``value`` if it names an activation range method, else a :class:`QBHError` naming the valid ones."""
    if not isinstance(value, str) or value not in ACT_RANGES:
        raise QBHError(f"{what} {value!r} is not known; use one of {', '.join(ACT_RANGES)}")
    return value


def check_bits(bits: object, what: str = "bits", *, role: str = "weight") -> int:
    """``bits`` as an int in its role's range (weights and embeddings 2..8, activations 2..16), else a
    :class:`QBHError` naming the value and the range. The one width check of the package."""
    lo, hi = BIT_RANGES[role]
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise QBHError(f"{what} {bits!r} is not an integer; use an integer from {lo} to {hi}")
    if not lo <= bits <= hi:
        raise QBHError(f"{what} {bits} is out of range; use an integer from {lo} to {hi}")
    return bits


class TraceMode(str, Enum):
    """How the Hutchinson trace of each block is estimated.

    ``block``: Rademacher probes over one block at a time, through the draw's graph (exact in expectation).
    ``shared``: one full-model probe per sample; each block's trace is read off the same Hv (the cross-block
    terms v_b^T H_bc v_c have mean zero, so it is unbiased, but noisier; its variance is reported).
    ``none``: skip the trace.
    """

    BLOCK = "block"
    SHARED = "shared"
    NONE = "none"


class TraceMethod(str, Enum):
    """Which estimator makes a block's trace (``hessian/trace.py``).

    ``hutchinson``: the mean of Rademacher samples v^T H v.
    ``hutchpp``: Hutch++ (Meyer et al. 2021): a third of the products sketch H's top subspace, a third take the
    trace there exactly, the rest probe the remainder by Hutchinson; its standard error is that of the
    remainder. Per block only (``trace = block``).
    """

    HUTCHINSON = "hutchinson"
    HUTCHPP = "hutchpp"


# Hutch++'s smallest budget per draw: a sketch of 1 (2 products) and 2 residual probes for a standard error.
HUTCHPP_MIN_PRODUCTS = 4


class EigenMethod(str, Enum):
    """How the top eigenvalue of a block is found.

    ``lanczos``: Ritz values of a Lanczos run (fewer products; the most negative eigenvalue comes free).
    ``power``: power iteration with deflation, as Q-BERT and PyHessian do.
    """

    LANCZOS = "lanczos"
    POWER = "power"


class Precision(str, Enum):
    """The arithmetic of the Hessian-vector products (``hessian/hvp.py``: :func:`autocast_products`).

    ``fp32``: every product in float32 (the default; the numbers of every earlier report).
    ``bf16``: every product with its matrix products in bfloat16 (autocast), no check: about 1% error per
    product, which reaches the eigenvalues and traces uncorrected.
    ``mixed``: the eigen-solver runs on bf16 products, then every reported eigenvalue is certified by one float32
    product of its Ritz vector (Rayleigh quotient and residual bound), continuing in float32 from that vector
    when the bound misses the tolerance: the values are within ``tol`` of the float32 operator's by the same
    estimate (residual over the gap to the other Ritz values) that the float32 engine stops on. Traces in
    float32.
    """

    FP32 = "fp32"
    BF16 = "bf16"
    MIXED = "mixed"


class Parallel(str, Enum):
    """How the ranks of a torch.distributed job (torchrun) share the sensitivity work; the numbers are the same.

    ``data``: every rank holds the graphs of its share of each draw's batches; a Hessian-vector product is the
    local sum and one all-reduce. Memory per rank shrinks with the ranks: the mode for large draws.
    ``blocks``: whole blocks are spread over the ranks, each computed as one process would; no communication
    during products, but every rank holds whole draws: the mode for many blocks on small draws.
    ``auto``: ``data`` when every draw has at least one batch per rank, else ``blocks``.
    """

    AUTO = "auto"
    DATA = "data"
    BLOCKS = "blocks"


class _Config:
    """Shared ``to_dict`` / ``from_dict`` for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else value
        return out

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Each field's description from the class docstring's ``Args:`` section (the CLI's help text, so the
        documentation and ``--help`` are one text)."""
        doc = inspect.getdoc(cls) or ""
        helps: dict[str, str] = {}
        name = None
        for line in doc.split("Args:", 1)[-1].splitlines() if "Args:" in doc else []:
            m = re.match(r"^    (\w+): (.*)$", line)
            if m:
                name, helps[m.group(1)] = m.group(1), m.group(2)
            elif name and line.startswith("        "):
                helps[name] += " " + line.strip()
            elif line.strip():
                break

        def plain(text: str) -> str:
            text = re.sub(r"\s*\(see :\w+:`[^`]*`\)", "", text)  # a pointer into the API docs
            text = re.sub(r":\w+:`~?(?:[\w.]*\.)?(\w+)`", r"\1", text)
            return text.replace("``", "").rstrip(".")

        return {k: plain(v) for k, v in helps.items()}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a TOML/JSON mapping: unknown keys and values of the wrong type are refused, naming the key."""
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise QBHError(f"unknown {cls.__name__} key(s) {', '.join(unknown)}; valid keys are {', '.join(names)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _typed(cls.__name__, k, v, hints[k]) for k, v in data.items()})


def _typed(owner: str, key: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits the annotation ``hint`` (an int for a float is widened), else a :class:`QBHError`."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for t in options:
        if t is type(None) and value is None:
            return None
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if isinstance(t, type) and issubclass(t, Enum) and isinstance(value, str):
            return value  # the config's own check names the valid members
        if typing.get_origin(t) is tuple and isinstance(value, (list, tuple)):
            (item,) = {a for a in typing.get_args(t) if a is not Ellipsis}
            return tuple(_typed(owner, key, v, item) for v in value)
    want = " or ".join(_type_name(t) for t in options)
    raise QBHError(f"{owner}.{key} = {value!r} is not {want}; write e.g. {key} = {_example(options)}")


def _type_name(t: Any) -> str:
    if t is type(None):
        return "none"
    if typing.get_origin(t) is tuple:
        return f"a list of {_type_name(typing.get_args(t)[0])}s"
    if isinstance(t, type) and issubclass(t, Enum):
        return "one of " + ", ".join(repr(m.value) for m in t)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(t, str(t))


def _example(options: tuple[Any, ...]) -> str:
    t = next(o for o in options if o is not type(None))
    if typing.get_origin(t) is tuple:
        return "[2, 3, 4]"
    if isinstance(t, type) and issubclass(t, Enum):
        return f'"{next(iter(t)).value}"'
    return {bool: "true", int: "2", float: "0.5", str: '"text"'}.get(t, "...")


def _positive(cls_name: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise QBHError(f"{cls_name}.{name} must be a positive number, got {value!r}")


def _non_negative(cls_name: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise QBHError(f"{cls_name}.{name} must be an integer >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GPTQConfig(_Config):
    """Settings of second-order rounding (GPTQ, Frantar et al. 2023; ``quant/gptq.py``), as a plan records them.

    Args:
        calib_samples: training sequences (a seeded draw) whose inputs to every quantized linear make its Hessian
            H = 2 X X^T (GPTQ: 128).
        damp: dampening added to the diagonal of H, as a fraction of its mean (GPTQ: 0.01).
        act_order: round the input columns by decreasing diag(H); the grid stays fixed (static groups).
        block_size: columns per lazy batch update (the codes do not depend on it beyond float rounding).
    """

    calib_samples: int = 128
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128

    def __post_init__(self) -> None:
        for name in ("calib_samples", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QBHError(f"GPTQConfig.{name} must be a positive integer, got {value!r}")
        _positive("GPTQConfig", damp=self.damp)
        if not isinstance(self.act_order, bool):
            raise QBHError(f"GPTQConfig.act_order must be true or false, got {self.act_order!r}")


# The fix for too many calibration sequences, as each caller's user sets them: command-line flags, or run.toml keys
_CALIB_FIXES = {
    "flags": "pass --calib-samples {n} or fewer, or --rounding nearest",
    "keys": 'set calib_samples = {n} or fewer, or rounding = "nearest" ([allocate] or the plan\'s own)',
}


def check_calib_samples(calib_samples: int, available: int, *, what: str | None = None, fix: str = "flags") -> None:
    """Refuse second-order rounding that asks for more calibration sequences than the training split holds: the
    one check and message, for a run's plans before any stage runs and wherever the sequences are drawn.

    Args:
        calib_samples: the sequences GPTQ asks for (:attr:`GPTQConfig.calib_samples`).
        available: the training split's sequences.
        what: who asks (``"plan 'mixed-3'"``), named first in the message; None names no one.
        fix: how the caller's user changes the settings: ``"flags"`` (the commands' ``--calib-samples`` and
            ``--rounding``) or ``"keys"`` (``calib_samples`` and ``rounding`` in run.toml).

    Raises:
        QBHError: ``calib_samples`` exceeds ``available``.
    """
    if calib_samples > available:
        raise QBHError(
            f"{f'{what}: ' if what else ''}second-order rounding (gptq) asks for {calib_samples} calibration "
            f"sequences but the training split has {available}; {_CALIB_FIXES[fix].format(n=available)}"
        )


@dataclasses.dataclass(frozen=True)
class SensitivityConfig(_Config):
    """Settings of the Q-BERT sensitivity protocol.

    Each of ``draws`` data draws is ``batches_per_draw`` batches of ``batch_size`` training examples (or, with
    ``draw_fraction``, that share of the training split in batches of ``batch_size``) sampled without replacement
    with the seed ``(seed, draw)``. On each draw the top Hessian eigenvalue of every block
    is found by power iteration (relative tolerance ``tol``, at most ``max_iters`` products), then
    Omega = |mean| + std over draws (Shen et al. 2020, Q-BERT, Sec. 3.2).

    Args:
        draws: number of data draws (Q-BERT: 10).
        batch_size: examples per batch.
        batches_per_draw: batches averaged into one draw's loss (their graphs are all kept in memory).
        draw_fraction: instead of batches_per_draw, each draw is this share of the training split (Q-BERT: 0.1),
            round(fraction x examples) examples in batches of batch_size (the last one smaller).
        method: ``lanczos`` (fewer products) or ``power`` (power iteration, as Q-BERT and PyHessian).
        max_iters: cap on Hessian-vector products per eigenvalue.
        tol: when to stop: Lanczos stops when the residual-based error estimate of the eigenvalue is at most
            ``tol`` relative, power iteration when the estimate moved by at most ``tol`` relative in one step.
        top_k: eigenvalues per block and draw (deflation); the first one is the score.
        most_negative: also estimate the most negative eigenvalue of each block.
        trace: ``block``, ``shared`` or ``none`` (see :class:`TraceMode`).
        trace_method: ``hutchinson`` or ``hutchpp`` (Hutch++, with ``trace = block`` only) (see
            :class:`TraceMethod`); the report names the estimator of every trace.
        trace_samples: Hessian-vector products per draw for the trace (Hutchinson: probes; Hutch++: sketch,
            sketch products and probes, at least 4); pooled over draws.
        warm_start: start each draw's power iteration from the previous draw's eigenvector.
        length_buckets: cut each batch into at most this many micro-batches of similar length for the
            products (the same loss on less padding; 1: never).
        seed: seeds the data draws and the random start vectors.
        max_length: tokenizer truncation length.
        parallel: how ranks share the work under torchrun: ``data`` (each rank a share of every draw's batches),
            ``blocks`` (each rank whole blocks) or ``auto`` (``data`` when a draw has a batch per rank, else
            ``blocks``); the numbers are the same, one process ignores it (see :class:`Parallel`).
        shared_graph: build one graph per draw over every pending block's parameters and run each block's products
            through it (one forward and backward per draw instead of one per block); off, each block builds its
            own, which needs less memory at once. The numbers are the same (to float rounding).
        reuse_memory: keep the memory the products free in the process for the next product instead of handing
            it back to the kernel (glibc's mallopt, qbert_hessian/hessian/memory.py): a fifth of the page faults
            and 5-15% less time. The numbers are the same; off, the system allocator's defaults.
        precision: the products' arithmetic: ``fp32``, ``bf16`` (matrix products in bfloat16, about 1% error per
            product, unchecked) or ``mixed`` (bf16 products, every eigenvalue checked by a float32 product
            against ``tol``) (see :class:`Precision`).
    """

    draws: int = 10
    batch_size: int = 32
    batches_per_draw: int = 1
    method: EigenMethod = EigenMethod.LANCZOS
    max_iters: int = 100
    tol: float = 1e-3
    top_k: int = 1
    most_negative: bool = False
    trace: TraceMode = TraceMode.BLOCK
    trace_method: TraceMethod = TraceMethod.HUTCHINSON
    trace_samples: int = 4
    warm_start: bool = True
    length_buckets: int = 4
    seed: int = 0
    max_length: int = 128
    draw_fraction: float | None = None
    parallel: Parallel = Parallel.AUTO
    shared_graph: bool = True
    reuse_memory: bool = True
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        _positive(
            "SensitivityConfig",
            draws=self.draws,
            batch_size=self.batch_size,
            batches_per_draw=self.batches_per_draw,
            max_iters=self.max_iters,
            tol=self.tol,
            top_k=self.top_k,
            trace_samples=self.trace_samples,
            length_buckets=self.length_buckets,
            max_length=self.max_length,
        )
        _non_negative("SensitivityConfig", seed=self.seed)
        _set_enum(self, "trace", TraceMode, "trace mode")
        _set_enum(self, "trace_method", TraceMethod, "trace method")
        _set_enum(self, "method", EigenMethod, "eigen method")
        _set_enum(self, "precision", Precision, "precision")
        if self.trace_method is TraceMethod.HUTCHPP and self.trace is TraceMode.SHARED:
            raise QBHError(
                "trace method 'hutchpp' sketches each block's own Hessian, so it cannot share full-model products; "
                "use --trace block, or --trace-method hutchinson with --trace shared"
            )
        if self.trace_method is TraceMethod.HUTCHPP and self.trace is TraceMode.BLOCK:
            if self.trace_samples < HUTCHPP_MIN_PRODUCTS:
                raise QBHError(
                    f"SensitivityConfig.trace_samples = {self.trace_samples} is too few for Hutch++ (a sketch of 1 "
                    f"takes 2 products, its standard error 2 probes); use --trace-samples {HUTCHPP_MIN_PRODUCTS} "
                    "or more"
                )
        _set_enum(self, "parallel", Parallel, "parallel mode")
        f = self.draw_fraction
        if f is not None:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (math.isfinite(f) and 0 < f <= 1):
                raise QBHError(f"SensitivityConfig.draw_fraction must lie in (0, 1], e.g. 0.1; got {f!r}")
            if self.batches_per_draw != 1:
                raise QBHError(
                    "give SensitivityConfig.draw_fraction or SensitivityConfig.batches_per_draw, not both: a draw "
                    "is either a share of the training split or a number of batches"
                )

    def protocol(self) -> dict[str, Any]:
        """The settings that decide the numbers, as recorded in reports and run caches: :meth:`to_dict` without
        ``parallel``, ``shared_graph`` and ``reuse_memory`` (how the work is shared out and where its memory comes
        from change no result), without ``draw_fraction`` while it is unset
        without ``trace_method`` while it is Hutchinson's and without ``precision`` while it is ``fp32`` (so reports
        and caches made before any of them existed still match)."""
        out = self.to_dict()
        del out["parallel"], out["shared_graph"], out["reuse_memory"]
        if out["draw_fraction"] is None:
            del out["draw_fraction"]
        if out["trace_method"] == TraceMethod.HUTCHINSON.value:
            del out["trace_method"]
        if out["precision"] == Precision.FP32.value:
            del out["precision"]
        return out


def _set_enum(cfg: object, field: str, enum: type[Enum], what: str) -> None:
    value = getattr(cfg, field)
    try:
        object.__setattr__(cfg, field, enum(value))
    except ValueError:
        valid = ", ".join(m.value for m in enum)
        raise QBHError(f"unknown {what} '{value}'; choose one of {valid}") from None


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(_Config):
    """Settings of the FP32 fine-tuning run (transformers ``Trainer``).

    Args:
        epochs: passes over the training split.
        lr: peak learning rate of the linear schedule.
        batch_size: training batch size.
        warmup_ratio: share of steps with linear warm-up.
        weight_decay: AdamW weight decay.
        max_train_samples: train on a seeded subset of this many examples (None: all).
        max_length: tokenizer truncation length.
        seed: seeds the subset and the Trainer.
        group_by_length: batch examples of similar length (less padding; the Trainer's length-grouped sampler).
    """

    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_train_samples: int | None = None
    max_length: int = 128
    seed: int = 0
    group_by_length: bool = False

    def __post_init__(self) -> None:
        _positive(
            "FinetuneConfig", epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, max_length=self.max_length
        )
        if self.max_train_samples is not None:
            _positive("FinetuneConfig", max_train_samples=self.max_train_samples)
        _non_negative("FinetuneConfig", seed=self.seed)
        if not isinstance(self.group_by_length, bool):
            raise QBHError(f"FinetuneConfig.group_by_length must be true or false, got {self.group_by_length!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise QBHError(f"FinetuneConfig.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")


class Measure(str, Enum):
    """What the allocator's cost of a (block, width) entry is.

    Weighted perturbation s_b * ||Q_b(W) - W||^2 (the round-to-nearest cost table) with s_b:
    ``omega``: Q-BERT's |mean| + std of the top eigenvalue; ``trace``: HAWQ-V2's Tr(H_b) / n_b.

    Priced losses (the entry *is* the predicted loss change, for the plan's own rounding; ``quant/profile.py``):
    ``quadratic``: g^T dW + 1/2 dW^T H dW with the block's gradient and Hessian on the sensitivity draws;
    ``measured``: the loss increase measured with only that block quantized (OBC's database).
    """

    OMEGA = "omega"
    TRACE = "trace"
    QUADRATIC = "quadratic"
    MEASURED = "measured"

    @property
    def priced(self) -> bool:
        """Whether the entries are priced losses (no sensitivity weight), made for one rounding."""
        return self in (Measure.QUADRATIC, Measure.MEASURED)


PRICED_MEASURES = tuple(m.value for m in Measure if m.priced)


class Method(str, Enum):
    """``milp``: exact optimum; ``rank``: Q-BERT's rule (bits monotone in sensitivity); ``uniform``."""

    MILP = "milp"
    RANK = "rank"
    UNIFORM = "uniform"


class Deploy(str, Enum):
    """What a plan's predicted size is the size of: ``packed`` (the packed checkpoint's ``model.safetensors``) or
    ``onnx`` (``onnx/model.onnx`` of ``qbert-hessian export --format onnx``; widths 2, 4, 8 only, the ones ONNX
    Runtime has kernels for)."""

    PACKED = "packed"
    ONNX = "onnx"


ONNX_KERNEL_BITS = (2, 4, 8)  # the widths ONNX Runtime's MatMulNBits / GatherBlockQuantized have kernels for


class Assign(str, Enum):
    """How a budget plan's widths are reassigned after the solver chose them (the allocation test, issue 10).

    The solver's widths are permuted among units of the same size (the same number of weights and the same bytes
    at every candidate width; in BERT every layer), so the packed size is unchanged:

    ``reversed``: the i-th most sensitive unit gets the plan's i-th smallest width, so the most bits go to the
    least sensitive units (for a plan whose widths rise with sensitivity, its mirror image along the ranking).
    ``random``: a seeded uniformly random permutation.
    """

    REVERSED = "reversed"
    RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class Budget(_Config):
    """Exactly one of: ``max_mb`` (whole model, MiB), ``ratio`` (compression vs FP32), ``avg_bits`` (encoder)."""

    max_mb: float | None = None
    ratio: float | None = None
    avg_bits: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.to_dict().items() if v is not None}
        if len(given) != 1:
            raise QBHError("give exactly one budget: --budget-mb, --ratio or --avg-bits")
        ((key, value),) = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise QBHError(f"budget {key}={value!r} must be a positive finite number")


@dataclasses.dataclass(frozen=True)
class AllocConfig(_Config):
    """Allocator settings.

    Args:
        bits: candidate widths for the encoder blocks (Q-BERT: 2, 3, 4, 8).
        groups: grouping of every encoder matrix (1, heads, an integer, channel; Q-BERT: 128).
        measure: ``omega`` (Q-BERT: |mean| + std of the top eigenvalue) or ``trace`` (trace / #params, HAWQ-V2),
            each weighing the round-to-nearest ||Q(W)-W||^2; or a priced loss per entry, made for the plan's
            rounding: ``quadratic`` (g.dW + 1/2 dW.H.dW on the sensitivity draws) or ``measured`` (the draws'
            loss increase with only that block quantized).
        method: ``milp`` (exact), ``rank`` (Q-BERT's rule: the most sensitive blocks get the most bits) or
            ``uniform``.
        embedding_bits: width of the word-embedding table (Q-BERT: 8).
        position_bits: width of the position table (default: ``embedding_bits``).
        embedding_groups: grouping of the embedding tables (``channel``: one scale per row).
        act_bits: activation width on quantized linears (None: FP32 activations).
        range_method: how each group's range is chosen, ``max`` (Q-BERT: the group's extent) or ``mse`` (the
            clipping ratio of least squared error, ``quant/ranges.py``). The cost table must be measured with
            the same method (its errors depend on it); one method serves every plan of a run.
        rounding: how each weight rounds onto its group's grid (the range method's): ``gptq``, second-order
            rounding on calibration inputs, layer by layer (Frantar et al. 2023; embedding tables keep nearest;
            applying the plan needs the task's training data), or ``nearest`` (no data).
        calib_samples: ``gptq``: training sequences (seeded) whose inputs make each layer's Hessian.
        damp: ``gptq``: dampening of each layer's Hessian, a fraction of its mean diagonal.
        act_range: how each quantized linear's input range is set: ``dynamic`` (a range per token at run time,
            ZeroQuant; nothing stored), or a static range from the calibration batches: ``max`` (an EMA of max|x|,
            Q8BERT), ``percentile`` (the 99.99th percentile of |x|) or ``mse`` (the clipping of least squared
            quantization error).
        deploy: the file the plan is priced for: ``packed`` (the packed checkpoint) or ``onnx`` (the ONNX export:
            candidate widths restricted to 2, 4, 8, the ones ONNX Runtime has kernels for, and the predicted size
            is the ONNX file's).
    """

    bits: tuple[int, ...] = (2, 3, 4, 8)
    groups: int | str = 128
    measure: Measure = Measure.OMEGA
    method: Method = Method.MILP
    embedding_bits: int = 8
    position_bits: int | None = None
    embedding_groups: int | str = "channel"
    act_bits: int | None = 8
    range_method: str = DEFAULT_RANGE_METHOD
    rounding: str = DEFAULT_ROUNDING
    calib_samples: int = GPTQConfig.calib_samples
    damp: float = GPTQConfig.damp
    act_range: str = DEFAULT_ACT_RANGE
    deploy: Deploy = Deploy.PACKED

    def __post_init__(self) -> None:
        bits = tuple(sorted({check_bits(b, "candidate bits") for b in self.bits}))
        if not bits:
            raise QBHError("give at least one candidate bit width, e.g. --bits 2,3,4,8")
        _set_enum(self, "deploy", Deploy, "deploy target")
        if self.deploy == Deploy.ONNX:
            _check_onnx_bits(bits, self.embedding_bits, self.position_bits)
            bits = tuple(b for b in bits if b in ONNX_KERNEL_BITS)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "groups", parse_groups(self.groups))
        object.__setattr__(self, "embedding_groups", parse_groups(self.embedding_groups))
        check_bits(self.embedding_bits, "embedding bits", role="embedding")
        if self.position_bits is not None:
            check_bits(self.position_bits, "position bits", role="embedding")
        if self.act_bits is not None:
            check_bits(self.act_bits, "activation bits", role="activation")
        _set_enum(self, "measure", Measure, "sensitivity measure")
        _set_enum(self, "method", Method, "allocation method")
        check_range_method(self.range_method, "AllocConfig.range_method")
        check_rounding(self.rounding, "AllocConfig.rounding")
        check_act_range(self.act_range, "AllocConfig.act_range")
        self.gptq_config()  # validates calib_samples and damp

    def gptq_config(self) -> GPTQConfig:
        """The GPTQ settings (used when ``rounding`` is ``gptq``)."""
        try:
            return GPTQConfig(calib_samples=self.calib_samples, damp=self.damp)
        except QBHError as exc:
            raise QBHError(str(exc).replace("GPTQConfig.", "AllocConfig.")) from None

    def protocol(self) -> dict[str, Any]:
        """The settings that decide a plan, as run caches record them: :meth:`to_dict` without ``rounding``,
        ``calib_samples``, ``damp`` and ``act_range`` while they hold the values records made before they were
        settings were computed with (:data:`UNRECORDED`: nearest, 128, 0.01, max), so those run folders still
        match. Not the defaults: with rounding now ``gptq`` by default, leaving the default out would let a folder
        rounded to nearest (which records no rounding) pass for a GPTQ one."""
        return without_unrecorded(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.deploy == Deploy.PACKED:  # the default: fingerprints of runs made before the setting existed hold
            del out["deploy"]
        return out


def _check_onnx_bits(bits: tuple[int, ...], embedding_bits: int, position_bits: int | None) -> None:
    """Under ``deploy = onnx``: refuse what ONNX Runtime has no kernel for (the candidates are then restricted)."""
    kernels = ", ".join(map(str, ONNX_KERNEL_BITS))
    if not any(b in ONNX_KERNEL_BITS for b in bits):
        raise QBHError(
            f"{bits[0]}-bit weights under deploy onnx: ONNX Runtime has kernels for {kernels} bits only; plan "
            f"{kernels} bits, or price the packed checkpoint instead (deploy packed, the default)"
        )
    for what, b in (("embedding bits", embedding_bits), ("position bits", position_bits)):
        if b is not None and b not in ONNX_KERNEL_BITS:
            raise QBHError(
                f"{what} {b} under deploy onnx: ONNX Runtime has kernels for {kernels} bits only; use one of those"
            )


PLAN_KINDS = ("uniform", "avg_bits", "budget_mb", "ratio")


@dataclasses.dataclass(frozen=True)
class PlanSpec(_Config):
    """One plan of a run (a ``[[plans]]`` table): a name, exactly one of a uniform width or a budget, whether
    QAT follows, and allocator settings that override ``[allocate]`` for this plan.

    Args:
        name: letters, digits, '-', '_' or '.'; names the plan's files.
        uniform: every encoder block at this width (no budget).
        avg_bits: average bits per encoder weight.
        budget_mb: whole-model size limit in MiB.
        ratio: compression ratio against FP32 to reach at least.
        qat: QAT after direct quantization (None: the run's default).
        seed: this plan's QAT seed, which also draws its ``[qat] max_train_samples`` subset (None: ``[qat] seed``);
            the same plan under several names and seeds measures the seed-to-seed spread.
        assign: reassign the solved plan's widths among units of the same size, for the allocation test:
            ``reversed`` (the i-th most sensitive unit gets the i-th smallest width: most bits to the least
            sensitive) or ``random`` (a seeded permutation); the packed size stays the solver's, the objective
            is recomputed and the plan's method says so (None: the solver's own assignment).
        assign_seed: seeds assign = random (None: 0).
        distill, learn_scales: this plan's QAT recipe, as ``[qat]`` (None: the run's), so one run holds its
            ablations (e.g. logits-only distillation, or learned steps, beside the run's recipe).
        bits, groups, measure, method, embedding_bits, position_bits, embedding_groups, act_bits, rounding,
            calib_samples, damp, act_range: as :class:`AllocConfig` (None: the run's ``[allocate]``); one run can
            hold the same plan rounded to nearest and by GPTQ, or with other activation ranges. ``range_method``
            is not among them: the run measures one cost table, with ``[allocate] range_method``, for all its
            plans.
    """

    name: str
    uniform: int | None = None
    avg_bits: float | None = None
    budget_mb: float | None = None
    ratio: float | None = None
    qat: bool | None = None
    seed: int | None = None
    assign: str | None = None
    assign_seed: int | None = None
    distill: str | None = None
    learn_scales: bool | None = None
    bits: tuple[int, ...] | None = None
    groups: int | str | None = None
    measure: str | None = None
    method: str | None = None
    embedding_bits: int | None = None
    position_bits: int | None = None
    embedding_groups: int | str | None = None
    act_bits: int | None = None
    rounding: str | None = None
    calib_samples: int | None = None
    damp: float | None = None
    act_range: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanSpec:
        if "range_method" in data:
            raise QBHError(
                f"plan {data.get('name')!r} sets range_method; it is one setting of the whole run (its cost table "
                "is measured with it): set it in [allocate]"
            )
        return super().from_dict(data)

    def __post_init__(self) -> None:
        name = self.name
        if (
            not isinstance(name, str)
            or not name
            or not name.replace("-", "").replace("_", "").replace(".", "").isalnum()
        ):
            raise QBHError(f"every [[plans]] entry needs a name of letters, digits, '-', '_' or '.'; got {name!r}")
        kinds = [k for k in PLAN_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise QBHError(f"plan '{name}' needs exactly one of uniform, avg_bits, budget_mb, ratio")
        if self.uniform is not None:
            check_bits(self.uniform, f"plan '{name}': uniform bits")
        else:
            Budget(max_mb=self.budget_mb, ratio=self.ratio, avg_bits=self.avg_bits)
        if self.qat is not None and not isinstance(self.qat, bool):
            raise QBHError(f"plan '{name}': qat must be true or false, got {self.qat!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise QBHError(f"plan '{name}': seed must be an integer >= 0, got {self.seed!r}")
        if self.bits is not None:
            object.__setattr__(self, "bits", tuple(self.bits) if isinstance(self.bits, (list, tuple)) else self.bits)
        self._check_assign()
        self.alloc_config(AllocConfig())  # validates the overrides

    def _check_assign(self) -> None:
        name = self.name
        if self.assign is not None:
            if self.assign not in [a.value for a in Assign]:
                raise QBHError(
                    f"plan '{name}': assign {self.assign!r} is not known; use reversed or random, or leave it out "
                    "for the solver's own assignment"
                )
            if self.uniform is not None:
                raise QBHError(
                    f"plan '{name}': assign = \"{self.assign}\" reassigns the widths of a budget plan, but a uniform "
                    "plan gives every block the same width; drop assign or give avg_bits, budget_mb or ratio"
                )
            if self.method == Method.UNIFORM.value:
                raise QBHError(
                    f"plan '{name}': assign = \"{self.assign}\" reassigns the widths a budget solver chose; use "
                    "method milp or rank, or drop assign"
                )
        if self.assign_seed is not None:
            if self.assign != Assign.RANDOM.value:
                raise QBHError(
                    f'plan \'{name}\': assign_seed seeds assign = "random"; add assign = "random" or drop assign_seed'
                )
            seed = self.assign_seed
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise QBHError(f"plan '{name}': assign_seed must be an integer >= 0, got {seed!r}")

    def alloc_config(self, defaults: AllocConfig) -> AllocConfig:
        """``defaults`` with this plan's allocator settings on top."""
        over = {f: getattr(self, f) for f in AllocConfig.__dataclass_fields__ if getattr(self, f, None) is not None}
        if self.uniform is not None:
            over["bits"] = (self.uniform,)
        return dataclasses.replace(defaults, **over)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig(_Config):
    """How direct (post-training) quantization sets activation ranges: seeded training batches.

    Args:
        calibration_batches: batches run through the quantized model in eval mode.
        batch_size: examples per batch.
        seed: seeds which training examples are drawn.
    """

    calibration_batches: int = 8
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("CalibrationConfig", calibration_batches=self.calibration_batches, batch_size=self.batch_size)
        _non_negative("CalibrationConfig", seed=self.seed)


@dataclasses.dataclass(frozen=True)
class DensityConfig(_Config):
    """Stochastic Lanczos quadrature of a block's Hessian eigenvalue density (Ghorbani et al. 2019).

    Args:
        steps: Lanczos steps per probe (memory: this many vectors).
        probes: Rademacher probes averaged.
        batch_size: training examples in the one batch whose loss is analysed.
        seed: seeds the probes.
        precision: the products' arithmetic: ``fp32`` or ``bf16`` (matrix products in bfloat16, about 1% error per
            product, recorded with each density); ``mixed`` has no eigenvalue to certify here (see :class:`Precision`).
    """

    steps: int = 80
    probes: int = 1
    batch_size: int = 32
    seed: int = 0
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        _positive("DensityConfig", steps=self.steps, probes=self.probes, batch_size=self.batch_size)
        _non_negative("DensityConfig", seed=self.seed)
        _set_enum(self, "precision", Precision, "precision")
        if self.precision is Precision.MIXED:
            raise QBHError(
                "DensityConfig.precision 'mixed' certifies eigenvalues, and a density has none to certify; use fp32, "
                "or bf16 for faster, about 1% less exact products"
            )


class Direction(str, Enum):
    EIGEN = "eigen"
    EXTREME = "extreme"
    RANDOM = "random"
    GRADIENT = "gradient"


@dataclasses.dataclass(frozen=True)
class LandscapeConfig(_Config):
    """Settings of a loss surface.

    Args:
        directions: ``eigen`` (the top eigenvectors), ``extreme`` (the eigenvectors of the largest and of the
            smallest, most negative, eigenvalue: a saddle curves up along one axis and down along the other; a line
            follows the smallest), ``random`` or ``gradient``.
        dims: 1 (a line) or 2 (a plane).
        grid: points per axis (Q-BERT: 21).
        radius: the axes run over [-radius, radius] (Q-BERT: 0.4).
        batch_size: examples per batch.
        num_batches: fixed batches averaged at every point.
        split: ``train`` or ``dev``.
        max_iters: cap on products for the eigenvectors.
        tol: relative tolerance of the eigenvectors' power iteration.
        seed: seeds the batches and the random directions.
    """

    directions: Direction = Direction.EIGEN
    dims: int = 2
    grid: int = 21
    radius: float = 0.4
    batch_size: int = 32
    num_batches: int = 2
    split: str = "train"
    max_iters: int = 50
    tol: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.grid < 2:
            raise QBHError(
                f"LandscapeConfig.grid must be at least 2 (a point each side of the weights), got {self.grid}"
            )
        _non_negative("LandscapeConfig", seed=self.seed)
        _positive(
            "LandscapeConfig",
            grid=self.grid,
            radius=self.radius,
            batch_size=self.batch_size,
            num_batches=self.num_batches,
            max_iters=self.max_iters,
            tol=self.tol,
        )
        if self.dims not in (1, 2):
            raise QBHError(f"LandscapeConfig.dims must be 1 or 2, got {self.dims}")
        if self.split not in ("train", "dev"):
            raise QBHError(f"LandscapeConfig.split must be train or dev, got {self.split!r}")
        _set_enum(self, "directions", Direction, "direction kind")


DISTILL_MODES = ("none", "logits", "hidden", "full")


def distill_mode(value: object) -> str:
    """``none``, ``logits``, ``hidden`` or ``full``; the booleans of old configs mean ``logits`` / ``none``."""
    if isinstance(value, bool):
        return "logits" if value else "none"
    if value not in DISTILL_MODES:
        raise QBHError(
            f"QATConfig.distill {value!r} is not valid; use none, logits, hidden or full (true/false mean logits/none)"
        )
    return str(value)


@dataclasses.dataclass(frozen=True)
class QATConfig(_Config):
    """Settings of quantization-aware training.

    Args:
        epochs: passes over the training split.
        lr: peak learning rate (linear schedule).
        batch_size: training batch size.
        warmup_ratio: share of the steps with linear warm-up.
        weight_decay: AdamW weight decay.
        eval_steps: evaluate on dev every N steps and keep the best (0: only at the end).
        distill: what to distil from the FP32 teacher: ``none``, ``logits``, ``hidden`` (logits and every
            hidden state) or ``full`` (also every layer's attention); true/false (old configs) mean logits/none.
        temperature: distillation temperature T.
        alpha: weight of the logits term against the task loss (1: distillation only, as TernaryBERT).
        hidden_weight: weight w_h of the hidden-state MSE (``hidden``, ``full``).
        attention_weight: weight w_a of the attention MSE (``full``).
        learn_scales: train every group's step (LSQ) from the plan's range instead of recomputing it.
        quant_noise: share p of groups left in FP32 per training forward (0: plain QAT).
        group_by_length: batch examples of similar length (less padding; the Trainer's length-grouped sampler).
        max_train_samples: train on a seeded subset of this many examples (None: all).
        seed: seeds the subset and the Trainer.
    """

    epochs: float = 2.0
    lr: float = 2e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    eval_steps: int = 0
    distill: str = "none"
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    learn_scales: bool = False
    quant_noise: float = 0.0
    group_by_length: bool = False
    max_train_samples: int | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QATConfig:
        """As :meth:`_Config.from_dict`, with ``distill`` read by :func:`distill_mode` first, so the booleans of
        old configs are accepted and any other value gets the list of modes."""
        if "distill" in data:
            data = {**data, "distill": distill_mode(data["distill"])}
        return super().from_dict(data)

    def __post_init__(self) -> None:
        object.__setattr__(self, "distill", distill_mode(self.distill))
        _positive("QATConfig", epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, temperature=self.temperature)
        for name in ("hidden_weight", "attention_weight"):
            if getattr(self, name) < 0:
                raise QBHError(f"QATConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learn_scales", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                raise QBHError(f"QATConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.max_train_samples is not None:
            _positive("QATConfig", max_train_samples=self.max_train_samples)
        if self.eval_steps < 0:
            raise QBHError(f"QATConfig.eval_steps must be >= 0, got {self.eval_steps}")
        _non_negative("QATConfig", seed=self.seed)  # the Trainer refuses it only once training starts
        if not 0 <= self.alpha <= 1:
            raise QBHError(f"QATConfig.alpha must lie in [0, 1], got {self.alpha}")
        for name in ("quant_noise", "warmup_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise QBHError(f"QATConfig.{name} must lie in [0, 1), got {getattr(self, name)}")
