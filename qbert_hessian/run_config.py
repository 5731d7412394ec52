"""The run's configuration: the TOML file of ``qbert-hessian run``, parsed and checked before any stage runs.

A run is described by a TOML file whose tables map one-to-one onto the stage configs (``[model]``,
``[finetune]``, ``[sensitivity]``, ``[allocate]``, ``[[plans]]``, ``[qat]``, ``[run]``); ``--set
section.key=value`` overrides one setting. Relative paths in the file resolve against the file's folder.

Each ``[[plans]]`` entry is resolved here, once, against ``[allocate]``, ``[qat]`` and ``[run]`` into a
:class:`ResolvedPlan` (its allocator settings, budget and QAT recipe); planning, the run's stages and the report
take that object. ``run.json`` records the entries as written (:meth:`RunConfig.to_dict`), and
:func:`recorded_plans` resolves them again from there for a report of a finished run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import (
    UNRECORDED,
    AllocConfig,
    Budget,
    CalibrationConfig,
    FinetuneConfig,
    Parallel,
    PlanSpec,
    QATConfig,
    SensitivityConfig,
    _Config,
    _typed,
)
from .errors import QBHError

SECTIONS = ("out", "model", "finetune", "sensitivity", "allocate", "plans", "qat", "run")
RESERVED_PLAN_NAMES = ("frontier",)  # plans/frontier.json and .png are the frontier's
MAX_PLAN_NAME = 100  # a plan's files are <name>.json, <name>.md: well inside a file name's 255 bytes


# Which [section] of the run's TOML file each settings class reads, so messages name the key a person writes.
TOML_SECTIONS = {
    "ModelSpec": "[model]",
    "FinetuneConfig": "[finetune]",
    "SensitivityConfig": "[sensitivity]",
    "AllocConfig": "[allocate]",
    "PlanSpec": "[[plans]]",
    "QATConfig": "[qat]",
    "RunSettings": "[run]",
    "CalibrationConfig": "[run]",
}


def toml_names(message: str) -> str:
    """A library message names a settings class's field (``CalibrationConfig.seed``); a run's messages name
    the TOML key instead (``[run] seed``)."""
    pattern = r"\b(" + "|".join(TOML_SECTIONS) + r")\.(\w+)\b"
    return re.sub(pattern, lambda m: f"{TOML_SECTIONS[m.group(1)]} {m.group(2)}", message)


@dataclasses.dataclass(frozen=True)
class ModelSpec(_Config):
    """``[model]``: the model (alias, folder or hub name), the task, its data and the tokenizer's max length;
    ``max_eval_samples`` scores every stage on the same seeded subset of that many dev examples (None: all), a
    shortening a results row must state."""

    name: str
    task: str
    data: str | None = None
    text_columns: tuple[str, ...] | None = None
    label_column: str | None = None
    max_length: int = 128
    max_eval_samples: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise QBHError(f"[model] max_length must be at least 1, got {self.max_length}")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise QBHError(f"[model] max_eval_samples must be at least 1, got {self.max_eval_samples}")


EXPORT_FORMATS = ("onnx",)


@dataclasses.dataclass(frozen=True)
class RunSettings(_Config):
    """``[run]``: QAT by default for every plan, activation calibration, the frontier figure, and ``export``:
    formats each plan's packed checkpoint is also exported to and scored from (``["onnx"]``: ONNX Runtime, int8
    compute, in ``results/<plan>/onnx``, its dev score in ``results/<plan>/onnx.json`` and report.md)."""

    qat: bool = True
    calibration_batches: int = 8
    batch_size: int = 32
    seed: int = 0
    frontier: bool = True
    export: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        CalibrationConfig(self.calibration_batches, self.batch_size, self.seed)  # validates
        unknown = [f for f in self.export if f not in EXPORT_FORMATS]
        if unknown:
            raise QBHError(
                f'[run] export {", ".join(map(repr, unknown))} is not known; use export = ["onnx"] (each plan\'s '
                "packed checkpoint exported to results/<plan>/onnx and scored from that file) or leave it out"
            )
        object.__setattr__(self, "export", tuple(dict.fromkeys(self.export)))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not self.export:  # the default: run.json reads as before the setting existed
            del out["export"]
        return out

    @property
    def calibration(self) -> CalibrationConfig:
        return CalibrationConfig(self.calibration_batches, self.batch_size, self.seed)


@dataclasses.dataclass(frozen=True)
class ResolvedPlan:
    """One ``[[plans]]`` entry resolved against the run's ``[allocate]``, ``[qat]`` and ``[run]`` tables, once,
    when the config is parsed (:func:`resolve_plan`).

    Attributes:
        spec: the entry as written; ``run.json`` and the plan stage's inputs record it so.
        alloc: ``[allocate]`` with the plan's allocator settings on top (a uniform plan's width as its one
            candidate ``bits``).
        budget: the plan's budget (its ``budget_mb`` is :class:`~qbert_hessian.config.Budget`'s ``max_mb``);
            None for a uniform plan.
        qat: the QAT recipe the plan trains with, ``[qat]`` with the plan's own ``seed``, ``distill`` and
            ``learn_scales``; None when the plan is not trained (its ``qat``, else ``[run] qat``).
    """

    spec: PlanSpec
    alloc: AllocConfig
    budget: Budget | None
    qat: QATConfig | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def uniform(self) -> int | None:
        """The one width of a uniform plan (None: a budget plan)."""
        return self.spec.uniform

    @property
    def own_recipe(self) -> dict[str, Any]:
        """The QAT settings the plan sets itself (``distill``, ``learn_scales``), which its results row names."""
        return {k: getattr(self.spec, k) for k in ("distill", "learn_scales") if getattr(self.spec, k) is not None}


def resolve_plan(
    spec: PlanSpec, allocate: AllocConfig, qat: QATConfig | None = None, *, run_qat: bool = True
) -> ResolvedPlan:
    """``spec`` on top of ``allocate`` and ``qat`` (``run_qat``: whether a plan that does not say trains); without
    ``qat`` (the ``plan`` command) the plan has no QAT recipe. The recipe is checked even for a plan that is not
    trained, so a bad ``[[plans]]`` setting is refused whatever ``qat`` says."""
    alloc = spec.alloc_config(allocate)
    recipe = _plan_qat(qat, spec) if qat is not None else None
    trains = run_qat if spec.qat is None else spec.qat
    budget = None  # a uniform plan's
    if spec.uniform is None:
        budget = Budget(max_mb=spec.budget_mb, ratio=spec.ratio, avg_bits=spec.avg_bits)
    return ResolvedPlan(spec=spec, alloc=alloc, budget=budget, qat=recipe if trains else None)


def _plan_qat(qat: QATConfig, spec: PlanSpec) -> QATConfig:
    """``[qat]`` with the plan's own seed and recipe (distill, learn_scales), where it sets them."""
    over = {k: getattr(spec, k) for k in ("seed", "distill", "learn_scales") if getattr(spec, k) is not None}
    if not over:
        return qat
    try:
        return dataclasses.replace(qat, **over)
    except QBHError as exc:
        raise QBHError(f"plan '{spec.name}': {exc}") from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: the model and task, one config per stage, and the plans to make and evaluate (resolved)."""

    model: ModelSpec
    finetune: FinetuneConfig
    sensitivity: SensitivityConfig
    allocate: AllocConfig
    plans: tuple[ResolvedPlan, ...]
    qat: QATConfig
    run: RunSettings
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The config as ``run.json`` records it (the plans as written)."""
        return {
            "out": self.out,
            "model": self.model.to_dict(),
            "finetune": self.finetune.to_dict(),
            "sensitivity": self.sensitivity.to_dict(),
            "allocate": self.allocate.to_dict(),
            "plans": [{k: v for k, v in p.spec.to_dict().items() if v is not None} for p in self.plans],
            "qat": self.qat.to_dict(),
            "run": self.run.to_dict(),
        }


def _parse_value(text: str, item: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if not text or text[0] in "[{\"'" or text.lower() in ("true", "false"):
            raise QBHError(f"--set '{item}': '{text}' is not a valid value; quote strings, e.g. key=\"text\"") from None
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``section.key=value`` settings on top of a config dict (values parsed as TOML, else plain strings)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name or not value.strip():
            raise QBHError(f"--set '{item}' is not section.key=value (e.g. --set sensitivity.draws=5)")
        if section not in SECTIONS or section in ("out", "plans"):
            raise QBHError(
                f"--set '{item}': unknown section '{section}'; use model, finetune, sensitivity, allocate, qat, run"
            )
        data.setdefault(section, {})[name] = _parse_value(value.strip(), item)
    return data


def _section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise QBHError(f"[{name}] must be a table of settings, got {value!r}")
    return dict(value)


def _resolve(value: str | None, base_dir: Path | None) -> str | None:
    """A relative path in a TOML file means a path relative to that file."""
    if value is None or base_dir is None or Path(value).is_absolute():
        return value
    candidate = base_dir / value
    return str(candidate) if candidate.exists() or value.startswith(".") else value


def parse_run_config(data: Mapping[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Validate a run config dict (from TOML) into a :class:`RunConfig`, every value's type included, before any
    stage runs; errors name the bad key."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise QBHError(f"unknown key(s) {', '.join(unknown)} at the top level; valid keys are {', '.join(SECTIONS)}")
    model = _model(data, base_dir)
    out = data.get("out")
    if out is not None:
        out = _resolve(_typed("run", "out", out, str | None), base_dir)
    specs = _plan_specs(data.get("plans", []))
    finetune = FinetuneConfig.from_dict({"max_length": model.max_length, **_section(data, "finetune")})
    sensitivity = SensitivityConfig.from_dict({"max_length": model.max_length, **_section(data, "sensitivity")})
    allocate = AllocConfig.from_dict(_section(data, "allocate"))
    qat = QATConfig.from_dict(_section(data, "qat"))
    run = RunSettings.from_dict(_section(data, "run"))
    plans = tuple(resolve_plan(s, allocate, qat, run_qat=run.qat) for s in specs)
    return RunConfig(model, finetune, sensitivity, allocate, plans, qat, run, out=out)


def _model(data: Mapping[str, Any], base_dir: Path | None) -> ModelSpec:
    m = _section(data, "model")
    for key in ("name", "task"):
        if key not in m:
            raise QBHError(f'[model] needs \'{key}\' (e.g. name = "minilm-l6", task = "sst2")')
    model = ModelSpec.from_dict(m)
    return dataclasses.replace(model, name=_resolve(model.name, base_dir), data=_resolve(model.data, base_dir))


def _plan_specs(plans_raw: Any) -> list[PlanSpec]:
    """The ``[[plans]]`` entries as written: at least one, names unique and usable as file names."""
    if not isinstance(plans_raw, list) or not all(isinstance(p, Mapping) for p in plans_raw):
        raise QBHError('[[plans]] must be a list of tables, e.g. [[plans]] name = "uniform-4" uniform = 4')
    plans = [PlanSpec.from_dict(p) for p in plans_raw]
    if not plans:
        raise QBHError('the run has no [[plans]]; add e.g. [[plans]] name = "uniform-4" uniform = 4')
    names = [p.name for p in plans]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise QBHError(f"plan name '{dup[0]}' is used twice; names must be unique")
    for n in names:
        if n in RESERVED_PLAN_NAMES:
            raise QBHError(f"plan name '{n}' is taken by the run's own {n}.json and {n}.png in plans/; rename the plan")
        if len(n) > MAX_PLAN_NAME:
            raise QBHError(
                f"plan name '{n[:20]}...' has {len(n)} characters; it names the plan's files, so keep it to "
                f"{MAX_PLAN_NAME} or fewer"
            )
    return plans


def recorded_plans(config: Mapping[str, Any]) -> tuple[ResolvedPlan, ...]:
    """The plans of a finished run, resolved from the config its ``run.json`` records (as they were when it ran; a
    setting its ``[allocate]`` does not record is read as :data:`~qbert_hessian.config.UNRECORDED` says it was
    made, not as today's default)."""
    allocate = AllocConfig.from_dict({**UNRECORDED, **config.get("allocate", {})})
    qat = QATConfig.from_dict(config.get("qat", {}))
    run_qat = RunSettings.from_dict(config.get("run", {})).qat
    return tuple(resolve_plan(PlanSpec.from_dict(p), allocate, qat, run_qat=run_qat) for p in config["plans"])


def load_run_config(path: Path | str, overrides: Sequence[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise QBHError(f"config file '{path}' does not exist; pass a TOML file (see experiments/sst2_minilm.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise QBHError(f"'{path}' is not valid TOML ({exc}); fix the file (UTF-8 text)") from None
    return parse_run_config(apply_overrides(data, overrides), base_dir=path.parent)


def check_world(config: RunConfig, world: int) -> None:
    """Refuse, before any stage runs, settings that cannot be shared over ``world`` processes: a training batch
    (``[finetune]``, ``[qat]``: the batch of all processes together) that does not split evenly, or a sensitivity
    stage with fewer batches in a draw than processes (data parallel) and fewer blocks than processes (block
    parallel)."""
    if world == 1:
        return
    for section, size in (("finetune", config.finetune.batch_size), ("qat", config.qat.batch_size)):
        if size % world:
            raise QBHError(
                f"[{section}] batch_size {size} is the batch of all {world} processes together and must split "
                f"evenly over them; use a multiple of {world} (--set {section}.batch_size=...)"
            )
    s = config.sensitivity
    if s.draw_fraction is not None or s.batches_per_draw >= world:
        return  # data parallel works (a draw_fraction's batch count is checked against the data at the stage)
    if s.parallel == Parallel.DATA:
        raise QBHError(
            f'[sensitivity] parallel = "data" gives every process a share of each draw\'s batches, but a draw has '
            f"{s.batches_per_draw} batch(es) for {world} processes; set batches_per_draw to at least {world}, "
            'draw_fraction, or parallel = "blocks"'
        )
    from .models import load_config

    model = load_config(config.model.name)
    layers = getattr(model, "num_hidden_layers", None) or getattr(model, "n_layers", None)
    if layers is not None and layers + 1 < world:
        raise QBHError(
            f"[sensitivity] a draw has {s.batches_per_draw} batch(es), fewer than the {world} processes, so they "
            f"would share the run's {layers + 1} blocks (the embeddings and {layers} layers), fewer than the "
            f"processes; set batches_per_draw to at least {world} (or draw_fraction), or launch fewer processes"
        )


# The offline default behind `qbert-hessian demo` / `make demo`: MiniLM-L6 on BBC News (5 topics, 1,780 training
# and 445 dev articles), sized so that set-up and demo finish within 15 minutes on 2 CPU cores. Its plans use the
# defaults (GPTQ rounding, dynamic 8-bit activation ranges) but calibrate GPTQ on 32 articles, not 128 (one pass per
# plan, about 10 s each here; 32 articles of 64 tokens are 2,048 tokens, more than the widest layer input, so every
# Hessian can be full rank). Articles are cut at 64 tokens and each QAT run sees 1,280 of the 1,780 articles: at 96
# tokens and the whole split the demo took 15.3 minutes (plus 2.5 of set-up).
DEMO_CONFIG: dict[str, Any] = {
    "model": {"name": "minilm-l6", "task": "bbc-news", "max_length": 64},
    "finetune": {"epochs": 2, "batch_size": 16, "lr": 1e-4},
    "sensitivity": {"draws": 3, "batch_size": 16, "trace_samples": 2},
    "allocate": {"groups": 128, "bits": [2, 3, 4, 8], "calib_samples": 32},
    "plans": [
        {"name": "uniform-4", "uniform": 4, "qat": False},
        {"name": "uniform-2", "uniform": 2},
        {"name": "mixed-2.5", "avg_bits": 2.5, "bits": [2, 3]},
    ],
    "qat": {"epochs": 1, "batch_size": 16, "lr": 1e-4, "distill": True, "max_train_samples": 1280},
    "run": {"calibration_batches": 4, "batch_size": 16},
}
