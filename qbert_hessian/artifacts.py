"""Versioned, self-describing artifacts handed between stages, and atomic file writes.

Every JSON artifact carries ``"schema": "qbert_hessian.<kind>/<major>"``; readers refuse another kind or an
unknown major version. Files are written to ``<name>.tmp`` and moved into place with ``os.replace``, so an
interruption never leaves a half-written artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .config import (
    PRICED_MEASURES,
    UNRECORDED,
    GPTQConfig,
    check_act_range,
    check_bits,
    check_range_method,
    check_rounding,
)
from .errors import QBHError
from .names import validate_block
from .packed_format import PACKED_SCHEMA

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


def publish(folder: Path | str) -> None:
    """Give every file in ``folder`` the mode a new file gets under the process umask (0644 under the usual 022):
    transformers and safetensors write weights 0600, which other users on the machine could not load."""
    mask = os.umask(0)
    os.umask(mask)
    for f in Path(folder).iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def replace_folder(new: Path, out_dir: Path, written: Callable[[str], bool]) -> None:
    """Put the finished folder ``new`` at ``out_dir``. An existing folder there is replaced, except for the entries
    that ``written`` says no writer of such a folder makes (a note, a results file): they are moved into the new
    one, after the swap, so a failure never takes them down with ``new``."""
    if not out_dir.exists():
        os.replace(new, out_dir)
        return
    old = out_dir.with_name(out_dir.name + ".replaced")
    if old.exists():
        shutil.rmtree(old)
    os.replace(out_dir, old)
    os.replace(new, out_dir)
    for entry in old.iterdir():
        if not written(entry.name) and not (out_dir / entry.name).exists():
            os.replace(entry, out_dir / entry.name)
    shutil.rmtree(old)


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


class Artifact:
    """Shared JSON handling of the artifact dataclasses: ``SCHEMA`` names the kind and major version.

    One policy for every reader: the schema must match (kind and major version), and a key the class does
    not know is refused with its name (a file from another version or a hand edit), never dropped silently.
    """

    SCHEMA: ClassVar[str]
    LEGACY_KEYS: ClassVar[tuple[str, ...]] = ()  # keys older writers added that are now derived or dropped

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": self.SCHEMA}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[A], data: Mapping[str, Any], *, where: str = "") -> A:
        what = where or cls.SCHEMA.rpartition("/")[0].rpartition(".")[2]
        data = {k: v for k, v in data.items() if k not in ("schema", *cls.LEGACY_KEYS)}
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise QBHError(
                f"{what} has unknown key(s) {', '.join(unknown)}; it was written by another version or edited "
                "by hand: regenerate it"
            )
        try:
            return cls(**{k: cls._field_from_json(k, v) for k, v in data.items()})
        except QBHError:
            raise
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise QBHError(f"{what} is malformed ({exc}); regenerate it") from None

    @classmethod
    def _field_from_json(cls, name: str, value: Any) -> Any:
        return value

    def save(self, path: Path | str) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[A], path: Path | str) -> A:
        return cls.from_dict(read_json(path, cls.SCHEMA), where=f"'{path}'")


def _plain(value: Any) -> Any:
    """Dataclasses, enums and tuples as JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


A = TypeVar("A", bound=Artifact)


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(data: Any) -> str:
    """A short, stable hash of JSON-ready data (configs, inputs)."""
    return hashlib.sha256(json.dumps(_plain(data), sort_keys=True, default=str).encode()).hexdigest()[:16]


def canonical(value: Any) -> Any:
    """``value`` as the JSON it is recorded as (tuples are lists, enums their values) with unset (``None``)
    dictionary entries dropped: a setting added to a config with a ``None`` default ("not set", the behaviour
    before it existed) leaves the stages recorded before it cached."""
    plain = json.loads(json.dumps(_plain(value), default=str))

    def drop(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: drop(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [drop(x) for x in v]
        return v

    return drop(plain)


@dataclasses.dataclass
class TraceStats:
    """A trace estimate, its standard error, and what made it.

    ``method`` names the estimator (``hutchinson``: the mean of v^T H v over ``samples`` probes; ``hutchpp``:
    Hutch++, whose ``samples`` are its residual probes). ``products`` counts the Hessian-vector products spent
    (Hutch++: sketch and probes; ``trace = shared``: full-model products, each serving every block). Reports
    written before these fields were Hutchinson's, one product per sample.
    """

    mean: float
    stderr: float
    samples: int
    method: str = "hutchinson"
    products: int | None = None

    def __post_init__(self) -> None:
        if self.products is None:
            self.products = self.samples

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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
            data["trace"] = TraceStats.from_dict(data["trace"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass
class SensitivityReport(Artifact):
    """The output of the sensitivity stage (``sensitivity.json``).

    ``model`` describes the model (name, family, num_layers, num_heads), ``config`` is the resolved
    :class:`~qbert_hessian.config.SensitivityConfig`, ``draws`` lists each draw's seed and example indices,
    ``blocks`` the finished blocks in order, ``pending`` the blocks still to do (empty when ``complete``).
    ``inputs`` fingerprints what the report was computed from (model weights, data, settings), so a resume
    or a cached stage can tell a report of other inputs. The allocator's cost table is a separate artifact,
    :class:`QuantProfile` (``profile.json``).
    """

    SCHEMA: ClassVar[str] = SENSITIVITY_SCHEMA
    LEGACY_KEYS: ClassVar[tuple[str, ...]] = ("complete", "quantization")

    model: dict[str, Any]
    task: str
    config: dict[str, Any]
    draws: list[dict[str, Any]]
    blocks: list[BlockSensitivity]
    pending: list[str]
    seconds: float = 0.0
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    created_by: str = CREATED_BY

    def __post_init__(self) -> None:
        layers = self.model.get("num_layers") if isinstance(self.model, dict) else None
        if isinstance(layers, int):
            for name in [*(b.name for b in self.blocks), *self.pending]:
                try:
                    validate_block(name, layers)
                except QBHError as exc:
                    raise QBHError(
                        f"the sensitivity report names a block of another model: {exc}; rerun sensitivity"
                    ) from None

    @property
    def complete(self) -> bool:
        return not self.pending

    def block(self, name: str) -> BlockSensitivity:
        for b in self.blocks:
            if b.name == name:
                return b
        raise QBHError(f"block '{name}' is not in this report; it has {', '.join(b.name for b in self.blocks)}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "complete": self.complete}

    @classmethod
    def _field_from_json(cls, name: str, value: Any) -> Any:
        if name == "blocks":
            return [BlockSensitivity.from_dict(b) for b in value]
        if name == "seconds":
            return float(value)
        return value


PLAN_SCHEMA = "qbert_hessian.plan/1"
METRICS_SCHEMA = "qbert_hessian.metrics/1"
RUN_SCHEMA = "qbert_hessian.run/1"
QAT_SCHEMA = "qbert_hessian.qat/1"
PROFILE_SCHEMA = "qbert_hessian.profile/1"
SIZE_SCHEMA = "qbert_hessian.size/1"
FRONTIER_SCHEMA = "qbert_hessian.frontier/1"
DENSITY_SCHEMA = "qbert_hessian.density/1"
EVALUATION_SCHEMA = "qbert_hessian.evaluation/1"


@dataclasses.dataclass
class BitPlan(Artifact):
    """Bits and grouping per block (``plan.json``): what :func:`~qbert_hessian.quant.apply.quantize_model` applies.

    ``blocks`` maps canonical block names to ``{"bits": b, "groups": g}``; a block that is absent stays FP32
    (the classifier head always does). A finer block (``encoder.3.query``) overrides its layer's entry.
    ``act_bits`` is the activation width on every quantized linear's input (None: FP32 activations).
    ``range_method`` how each group's range was chosen (``max`` or ``mse``, ``quant/ranges.py``; old plans: max).
    ``rounding`` how each weight rounds onto that grid: ``nearest`` (old plans), or ``gptq`` with its settings in
    ``gptq`` (:class:`~qbert_hessian.config.GPTQConfig`: calibration sequences, dampening, act-order, block size).
    ``act_range`` how each quantized linear's input range is set: ``max`` (an EMA of max|x|; old plans),
    ``percentile`` or ``mse`` (static, calibrated), or ``dynamic`` (per token at run time, nothing stored).
    ``model`` describes the model the plan was made for (name, family, num_layers, num_heads, hidden_size);
    ``predicted`` the sizes the allocator promised (bytes, MiB, compression, average encoder bits, objective).
    """

    SCHEMA: ClassVar[str] = PLAN_SCHEMA

    model: dict[str, Any]
    blocks: dict[str, dict[str, Any]]
    act_bits: int | None = 8
    symmetric: bool = True
    range_method: str = "max"
    rounding: str = UNRECORDED["rounding"]  # a plan without the key was made before the setting: nearest
    gptq: dict[str, Any] | None = None
    act_range: str = UNRECORDED["act_range"]  # likewise max (not the allocator's default, which is dynamic)
    method: str = "manual"
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    measure: str | None = None
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    predicted: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    created_by: str = CREATED_BY

    @property
    def predicted_packed_bytes(self) -> int | None:
        """The packed checkpoint's predicted size (``predicted["bytes"]`` is the ONNX file's under deploy onnx)."""
        return self.predicted.get("packed_bytes", self.predicted.get("bytes"))

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, dict):
            raise QBHError("plan 'blocks' must map block names to {bits, groups}; regenerate the plan")
        for name, entry in self.blocks.items():
            if not isinstance(entry, dict) or "bits" not in entry:
                raise QBHError(f"plan block '{name}' needs a 'bits' entry, e.g. {{\"bits\": 4, \"groups\": 128}}")
            unknown = sorted(set(entry) - {"bits", "groups"})
            if unknown:
                raise QBHError(f"plan block '{name}' has unknown key(s) {', '.join(unknown)}; valid: bits, groups")
            role = "embedding" if name.startswith("embeddings") else "weight"
            check_bits(entry["bits"], f"plan block '{name}': bits", role=role)
        if self.act_bits is not None:
            check_bits(self.act_bits, "plan act_bits", role="activation")
        if not isinstance(self.symmetric, bool):
            raise QBHError(f"plan 'symmetric' must be true or false, got {self.symmetric!r}; regenerate the plan")
        check_range_method(self.range_method, "plan range_method")
        check_rounding(self.rounding, "plan rounding")
        check_act_range(self.act_range, "plan act_range")
        if self.rounding == "gptq":
            if self.gptq is not None and not isinstance(self.gptq, dict):
                raise QBHError(f"plan 'gptq' must be a table of settings, got {self.gptq!r}; regenerate the plan")
            self.gptq = GPTQConfig.from_dict(self.gptq or {}).to_dict()  # every setting, defaults filled in
        elif self.gptq is not None:
            raise QBHError(
                f"plan rounds to {self.rounding} but carries gptq settings; drop 'gptq' or set rounding to gptq"
            )

    @property
    def gptq_config(self) -> GPTQConfig | None:
        """The GPTQ settings of a plan rounded by GPTQ (None: nearest rounding)."""
        return GPTQConfig.from_dict(self.gptq) if self.rounding == "gptq" and self.gptq is not None else None


@dataclasses.dataclass
class GroupCost:
    """One grouping of a unit: scales per matrix and ||Q_b(W) - W||^2 of the whole unit per width (``"2"``...)."""

    scales: list[int]
    error: dict[str, float]

    @property
    def num_scales(self) -> int:
        return sum(self.scales)


@dataclasses.dataclass
class UnitProfile:
    """An allocation unit (an encoder layer or linear, an embedding table) and what quantizing it costs.

    ``weights`` are the state-dict keys of its matrices, ``shapes`` their shapes, ``linear`` whether each is a
    linear layer's weight (it then gets an activation range); ``groups`` maps a grouping (``"128"``,
    ``"heads"`` ...) to its cost, ``unavailable`` a grouping that does not fit to the reason.
    """

    weights: list[str]
    shapes: list[list[int]]
    linear: list[bool]
    groups: dict[str, GroupCost]
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_weights(self) -> int:
        return sum(r * c for r, c in self.shapes)

    @property
    def num_linears(self) -> int:
        return sum(self.linear)

    def cost(self, groups: object) -> GroupCost:
        key = str(groups)
        if key in self.groups:
            return self.groups[key]
        why = self.unavailable.get(key)
        raise QBHError(
            why or f"the quantization profile has no errors for groups={groups}; pass --model so it is measured"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "shapes": self.shapes,
            "linear": self.linear,
            "groups": {g: dataclasses.asdict(c) for g, c in self.groups.items()},
            "unavailable": self.unavailable,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnitProfile:
        groups = {g: GroupCost(**c) for g, c in data["groups"].items()}
        return cls(data["weights"], data["shapes"], data["linear"], groups, dict(data.get("unavailable", {})))


@dataclasses.dataclass
class QuantProfile(Artifact):
    """The allocator's cost table (``profile.json``): per unit, width and grouping the weight perturbation
    ||Q_b(W) - W||^2, and every tensor of the FP32 state dict (name, dtype, shape), so the allocator predicts
    the packed file's size byte for byte without torch. Made by :func:`~qbert_hessian.quant.profile.measure_profile`.
    ``range_method`` is how every group's range was chosen when the errors were measured (``max`` or ``mse``);
    a plan is only made from a profile of its own range method.

    ``measure`` says what each entry of ``error`` is: None (the default, and every profile written before the
    setting existed) for the weight perturbation ||Q_b(W) - W||^2 of round-to-nearest, the table the ``omega`` and
    ``trace`` measures weigh by sensitivity; ``quadratic`` or ``measured`` for a priced loss change with only that
    unit quantized, made with ``rounding`` (and, for ``gptq``, the settings in ``gptq``). A priced profile holds
    entries for its encoder units only (its embedding units carry their scales under its groupings; the allocator
    sizes the embedding tables from their shapes under any grouping); a plan is only made from a profile of its own
    measure and rounding (:func:`~qbert_hessian.allocate.build_problem`).
    """

    SCHEMA: ClassVar[str] = PROFILE_SCHEMA

    model: dict[str, Any]
    symmetric: bool
    bits: list[int]
    tensors: list[list[Any]]  # [name, dtype, shape]
    units: dict[str, UnitProfile]
    range_method: str = "max"  # how the errors' ranges were chosen; profiles written before it existed used max
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    created_by: str = CREATED_BY
    measure: str | None = None  # None: ||Q(W)-W||^2 of nearest rounding; else a priced measure
    rounding: str = "nearest"
    gptq: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_range_method(self.range_method, "profile range_method")
        check_rounding(self.rounding, "profile rounding")
        if self.measure is not None and self.measure not in PRICED_MEASURES:
            raise QBHError(
                f"profile measure {self.measure!r} is not a priced measure ({', '.join(PRICED_MEASURES)}); "
                "regenerate the profile"
            )
        if self.measure is None and self.rounding != "nearest":
            raise QBHError("a weight-error profile (no measure) is made with nearest rounding; regenerate it")
        if self.rounding == "gptq":
            self.gptq = GPTQConfig.from_dict(self.gptq or {}).to_dict()
        elif self.gptq is not None:
            raise QBHError("profile rounds to nearest but carries gptq settings; regenerate the profile")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key, default in (("measure", None), ("rounding", "nearest"), ("gptq", None)):
            if out[key] == default:  # the weight-error table reads as it did before priced measures existed
                del out[key]
        return out

    @property
    def made_with(self) -> str:
        """What its entries are, in words, for messages."""
        if self.measure is None:
            return "||Q(W)-W||^2 of nearest rounding (the omega/trace table)"
        return f"measure {self.measure} with {self.rounding} rounding"

    @classmethod
    def _field_from_json(cls, name: str, value: Any) -> Any:
        if name == "units":
            return {u: UnitProfile.from_dict(e) for u, e in value.items()}
        return value

    def unit(self, name: str) -> UnitProfile:
        if name not in self.units:
            raise QBHError(
                f"the quantization profile has no unit {name} (it has {', '.join(self.units)}); "
                "measure it from the report's model (plan --model MODEL)"
            )
        return self.units[name]

    @property
    def state_bytes(self) -> int:
        from .packed_format import TensorSpec

        return sum(TensorSpec(n, d, tuple(s)).nbytes for n, d, s in self.tensors)


# The scores a person reads first, per task family, in table order (``evaluate`` returns them, with ``loss`` and
# ``num_examples``): classification accuracy and macro-F1; token entity-level F1 / precision / recall (seqeval)
# and token accuracy; QA SQuAD v1.1 exact match and F1.
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1"),
    "token": ("f1", "precision", "recall", "accuracy"),
    "qa": ("exact_match", "f1"),
}


@dataclasses.dataclass
class StageResult(Artifact):
    """Task metrics of one model of a run (``results/fp32.json``, ``direct.json``, ``metrics.json``).

    ``stage`` is ``fp32``, ``direct`` (post-training quantization), ``qat`` or ``onnx`` (the plan's packed model
    scored from its ONNX export, ``results/<plan>/onnx.json``); ``metrics`` the task metrics
    (``family`` says which: :data:`METRIC_COLUMNS`); ``bytes`` the weights file on disk (the packed file for
    quantized rows); ``inputs`` what made it.
    """

    SCHEMA: ClassVar[str] = METRICS_SCHEMA

    stage: str
    metrics: dict[str, Any]
    family: str = "classification"
    bytes: int | None = None
    plan: str | None = None
    direct: dict[str, Any] | None = None
    predicted_bytes: int | None = None
    qat: bool | None = None
    train_seconds: float | None = None
    examples_seen: int | None = None
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class QATLog(Artifact):
    """What QAT did (``qat.json``): wall time, steps, best dev metric, the Trainer's log and the config."""

    SCHEMA: ClassVar[str] = QAT_SCHEMA

    train_seconds: float
    steps: int
    best_metric: float | None
    log_history: list[dict[str, Any]]
    config: dict[str, Any]
    examples_seen: int | None = None


@dataclasses.dataclass
class RunRecord(Artifact):
    """``run.json``: the resolved configuration of a run and the inputs of every stage it holds."""

    SCHEMA: ClassVar[str] = RUN_SCHEMA

    config: dict[str, Any]
    stages: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SizeReport(Artifact):
    """``size.json`` beside a packed checkpoint: bytes on disk against the FP32 safetensors file and the plan."""

    SCHEMA: ClassVar[str] = SIZE_SCHEMA

    packed_bytes: int
    folder_bytes: int
    fp32_safetensors_bytes: int
    predicted_bytes: int | None

    @property
    def compression(self) -> float:
        return self.fp32_safetensors_bytes / self.packed_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "compression": self.compression}

    LEGACY_KEYS: ClassVar[tuple[str, ...]] = ("compression",)


@dataclasses.dataclass
class Frontier(Artifact):
    """``frontier.json``: MILP plans over a sweep of average-bit budgets, uniform plans, Q-BERT's rank rule."""

    SCHEMA: ClassVar[str] = FRONTIER_SCHEMA

    groups: str
    measure: str
    bits: list[int]
    fp32_mib: float
    points: list[dict[str, Any]]
    uniform: list[dict[str, Any]]


@dataclasses.dataclass
class DensityReport(Artifact):
    """``density.json``: the Hessian eigenvalue density of each block (stochastic Lanczos quadrature)."""

    SCHEMA: ClassVar[str] = DENSITY_SCHEMA

    model: str
    task: str
    batch_size: int
    probes: int
    densities: list[dict[str, Any]]


@dataclasses.dataclass
class Evaluation(Artifact):
    """``evaluate --out``: one row per evaluated model (FP32, direct quantization, packed checkpoints)."""

    SCHEMA: ClassVar[str] = EVALUATION_SCHEMA

    task: str
    results: list[dict[str, Any]]


@dataclasses.dataclass
class PackedManifest(Artifact):
    """``quantization.json`` of a packed checkpoint: the plan, the attention kernel, one entry per weight, and
    ``sha256``: the SHA-256 of the weights file's bytes followed by this manifest's own JSON without the
    ``sha256`` key (:meth:`digest`), so a damaged code or scale, or an edited setting (``symmetric``, bits,
    shapes), is found at load. Folders written before it have ``None``."""

    SCHEMA: ClassVar[str] = PACKED_SCHEMA

    plan: BitPlan
    attn_implementation: str
    tensors: dict[str, dict[str, Any]]
    sha256: str | None = None

    def digest(self, weights_file: Path | str) -> str:
        """The checksum of ``weights_file`` together with this manifest's settings (its JSON as written and
        read back, the ``sha256`` key left out)."""
        h = hashlib.sha256()
        with Path(weights_file).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        settings = {k: v for k, v in _finite(self.to_dict()).items() if k != "sha256"}
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()

    @classmethod
    def _field_from_json(cls, name: str, value: Any) -> Any:
        return BitPlan.from_dict(value, where="the packed plan") if name == "plan" else value
