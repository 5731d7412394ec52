"""Versioned, self-describing artifacts handed between stages, and atomic file writes.

Every JSON artifact carries ``"schema": "qbert_hessian.<kind>/<major>"``; readers refuse another kind or an
unknown major version. Files are written to ``<name>.tmp`` and moved into place with ``os.replace``, so an
interruption never leaves a half-written artifact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import QBHError

__version__ = "0.1.0"
CREATED_BY = f"qbert_hessian {__version__}"
SENSITIVITY_SCHEMA = "qbert_hessian.sensitivity/1"


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then move the file onto ``path``; the temporary file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: Path | str, text: str) -> Path:
    """Atomically write ``text`` (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path | str, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (non-finite floats become null)."""
    return write_text(path, json.dumps(_finite(data), indent=2) + "\n")


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def read_json(path: Path | str, schema: str) -> dict[str, Any]:
    """Read a JSON artifact and check its ``schema`` (same kind, same major version)."""
    path = Path(path)
    if not path.is_file():
        raise QBHError(f"file '{path}' does not exist; check the path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QBHError(f"'{path}' is not valid JSON ({exc}); regenerate it") from None
    found = data.get("schema") if isinstance(data, dict) else None
    kind, _, major = schema.rpartition("/")
    if not isinstance(found, str) or found.rpartition("/")[0] != kind:
        raise QBHError(f"'{path}' is not a {kind} artifact (schema {found!r}); pass a file written by qbert-hessian")
    if found.rpartition("/")[2] != major:
        raise QBHError(f"'{path}' has schema {found}, this version reads {schema}; regenerate it with this version")
    return data


@dataclasses.dataclass
class TraceStats:
    """A Hutchinson trace estimate: mean of v^T H v over ``samples`` probes, and its standard error."""

    mean: float
    stderr: float
    samples: int


@dataclasses.dataclass
class BlockSensitivity:
    """One block's curvature over the data draws.

    ``eigenvalues`` holds the top (largest-magnitude) eigenvalue per draw with its sign;
    ``omega = |mean| + std`` (Q-BERT); ``normalized_trace = trace / num_params`` (HAWQ-V2).
    """

    name: str
    num_params: int
    eigenvalues: list[float]
    mean: float
    std: float
    omega: float
    iterations: list[int]
    converged: list[bool]
    seconds: float
    top_k: list[list[float]] | None = None
    most_negative: list[float] | None = None
    trace: TraceStats | None = None
    normalized_trace: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockSensitivity:
        data = dict(data)
        if data.get("trace") is not None:
            data["trace"] = TraceStats(**data["trace"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass
class SensitivityReport:
    """The output of the sensitivity stage (``sensitivity.json``).

    ``model`` describes the model (name, family, num_layers, num_heads), ``config`` is the resolved
    :class:`~qbert_hessian.config.SensitivityConfig`, ``draws`` lists each draw's seed and example indices,
    ``blocks`` the finished blocks in order, ``pending`` the blocks still to do (empty when ``complete``).
    ``quantization`` is the weight-perturbation profile the allocator reads (sizes and ||Q_b(W) - W||^2 per
    block, bit width and grouping; see :func:`~qbert_hessian.quant.apply.quant_profile`).
    """

    model: dict[str, Any]
    task: str
    config: dict[str, Any]
    draws: list[dict[str, Any]]
    blocks: list[BlockSensitivity]
    pending: list[str]
    seconds: float = 0.0
    quantization: dict[str, Any] | None = None
    schema: str = SENSITIVITY_SCHEMA
    created_by: str = CREATED_BY

    @property
    def complete(self) -> bool:
        return not self.pending

    def block(self, name: str) -> BlockSensitivity:
        for b in self.blocks:
            if b.name == name:
                return b
        raise QBHError(f"block '{name}' is not in this report; it has {', '.join(b.name for b in self.blocks)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "created_by": self.created_by,
            "model": self.model,
            "task": self.task,
            "config": self.config,
            "complete": self.complete,
            "seconds": self.seconds,
            "draws": self.draws,
            "blocks": [b.to_dict() for b in self.blocks],
            "pending": self.pending,
            **({"quantization": self.quantization} if self.quantization is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityReport:
        try:
            return cls(
                model=data["model"],
                task=data["task"],
                config=data["config"],
                draws=data["draws"],
                blocks=[BlockSensitivity.from_dict(b) for b in data["blocks"]],
                pending=list(data.get("pending", [])),
                seconds=float(data.get("seconds", 0.0)),
                quantization=data.get("quantization"),
                schema=data["schema"],
                created_by=data.get("created_by", "unknown"),
            )
        except (KeyError, TypeError) as exc:
            raise QBHError(f"sensitivity report is malformed (missing or bad field {exc}); regenerate it") from None

    def save(self, path: Path | str) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path | str) -> SensitivityReport:
        return cls.from_dict(read_json(path, SENSITIVITY_SCHEMA))


PLAN_SCHEMA = "qbert_hessian.plan/1"
PACKED_SCHEMA = "qbert_hessian.packed/1"
METRICS_SCHEMA = "qbert_hessian.metrics/1"
RUN_SCHEMA = "qbert_hessian.run/1"
QAT_SCHEMA = "qbert_hessian.qat/1"


@dataclasses.dataclass
class BitPlan:
    """Bits and grouping per block (``plan.json``): what :func:`~qbert_hessian.quant.apply.quantize_model` applies.

    ``blocks`` maps canonical block names to ``{"bits": b, "groups": g}``; a block that is absent stays FP32
    (the classifier head always does). A finer block (``encoder.3.query``) overrides its layer's entry.
    ``act_bits`` is the activation width on every quantized linear's input (None: FP32 activations).
    ``model`` describes the model the plan was made for (name, family, num_layers, num_heads, hidden_size);
    ``predicted`` the sizes the allocator promised (bytes, MiB, compression, average encoder bits, objective).
    """

    model: dict[str, Any]
    blocks: dict[str, dict[str, Any]]
    act_bits: int | None = 8
    symmetric: bool = True
    method: str = "manual"
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    measure: str | None = None
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    predicted: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    schema: str = PLAN_SCHEMA
    created_by: str = CREATED_BY

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, dict):
            raise QBHError("plan 'blocks' must map block names to {bits, groups}; regenerate the plan")
        for name, entry in self.blocks.items():
            if not isinstance(entry, dict) or "bits" not in entry:
                raise QBHError(f"plan block '{name}' needs a 'bits' entry, e.g. {{\"bits\": 4, \"groups\": 128}}")
            unknown = sorted(set(entry) - {"bits", "groups"})
            if unknown:
                raise QBHError(f"plan block '{name}' has unknown key(s) {', '.join(unknown)}; valid: bits, groups")
            bits = entry["bits"]
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise QBHError(
                    f"plan block '{name}' has bits {bits!r}; use an integer from 2 to 8 (omit a block to keep FP32)"
                )
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or self.act_bits not in range(2, 17)):
            raise QBHError(f"plan act_bits {self.act_bits!r} is out of range; use 2..16, or null for FP32 activations")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {"schema": out.pop("schema"), "created_by": out.pop("created_by"), **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitPlan:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise QBHError(f"plan has unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(names))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise QBHError(f"plan is malformed ({exc}); regenerate it with qbert-hessian plan") from None

    def save(self, path: Path | str) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path | str) -> BitPlan:
        return cls.from_dict(read_json(path, PLAN_SCHEMA))
