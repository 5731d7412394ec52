"""Frozen configuration dataclasses, one per stage, with defaults that reproduce the papers.

Each is validated in ``__post_init__`` (a :class:`QBHError`, never an ``assert``), maps one-to-one onto the
CLI flags, and round-trips through ``to_dict`` / ``from_dict``; ``from_dict`` refuses unknown keys and
lists the valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

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


def check_bits(bits: object, what: str = "bits") -> int:
    """``bits`` as an int in 2..8, else a :class:`QBHError`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QBHError(f"{what} {bits!r} is out of range; use an integer from {MIN_BITS} to {MAX_BITS}")
    return bits


class TraceMode(str, Enum):
    """How the Hutchinson trace of each block is estimated.

    ``block``: Rademacher probes over one block at a time, reusing that block's graph (exact in expectation).
    ``shared``: one full-model probe per sample; each block's trace is read off the same Hv (the cross-block
    terms v_b^T H_bc v_c have mean zero, so it is unbiased, but noisier; its variance is reported).
    ``none``: skip the trace.
    """

    BLOCK = "block"
    SHARED = "shared"
    NONE = "none"


class EigenMethod(str, Enum):
    """How the top eigenvalue of a block is found.

    ``lanczos``: Ritz values of a Lanczos run (fewer products; the most negative eigenvalue comes free).
    ``power``: power iteration with deflation, as Q-BERT and PyHessian do.
    """

    LANCZOS = "lanczos"
    POWER = "power"


class _Config:
    """Shared ``to_dict`` / ``from_dict`` for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else value
        return out

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise QBHError(f"unknown {cls.__name__} key(s) {', '.join(unknown)}; valid keys are {', '.join(names)}")
        return cls(**data)


def _positive(cls_name: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise QBHError(f"{cls_name}.{name} must be positive, got {value}")


@dataclasses.dataclass(frozen=True)
class SensitivityConfig(_Config):
    """Settings of the Q-BERT sensitivity protocol.

    Each of ``draws`` data draws is ``batches_per_draw`` batches of ``batch_size`` training examples sampled
    without replacement with the seed ``(seed, draw)``. On each draw the top Hessian eigenvalue of every block
    is found by power iteration (relative tolerance ``tol``, at most ``max_iters`` products), then
    Omega = |mean| + std over draws (Shen et al. 2020, Q-BERT, Sec. 3.2).

    Args:
        draws: number of data draws (Q-BERT: 10).
        batch_size: examples per batch.
        batches_per_draw: batches averaged into one draw's loss (their graphs are all kept in memory).
        method: ``lanczos`` (default) or ``power`` (see :class:`EigenMethod`).
        max_iters: cap on Hessian-vector products per eigenvalue.
        tol: when to stop: Lanczos stops when the residual-based error estimate of the eigenvalue is at most
            ``tol`` relative, power iteration when the estimate moved by at most ``tol`` relative in one step.
        top_k: eigenvalues per block and draw (deflation); the first one is the score.
        most_negative: also estimate the most negative eigenvalue of each block.
        trace: ``block``, ``shared`` or ``none`` (see :class:`TraceMode`).
        trace_samples: Rademacher probes per draw for the trace; pooled over draws.
        warm_start: start each draw's power iteration from the previous draw's eigenvector.
        length_buckets: cut each batch into at most this many micro-batches of similar length for the
            products (the same loss on less padding; 1: never).
        seed: seeds the data draws and the random start vectors.
        max_length: tokenizer truncation length.
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
    trace_samples: int = 4
    warm_start: bool = True
    length_buckets: int = 4
    seed: int = 0
    max_length: int = 128

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
        _set_enum(self, "trace", TraceMode, "trace mode")
        _set_enum(self, "method", EigenMethod, "eigen method")


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
    """

    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_train_samples: int | None = None
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(
            "FinetuneConfig", epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, max_length=self.max_length
        )
        if self.max_train_samples is not None:
            _positive("FinetuneConfig", max_train_samples=self.max_train_samples)
        if not 0 <= self.warmup_ratio < 1:
            raise QBHError(f"FinetuneConfig.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
