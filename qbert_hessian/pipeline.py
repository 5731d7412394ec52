"""``qbert-hessian run``: every stage in order, each reused only while the inputs that made it are unchanged.

    finetune (unless the model already has the task family's head)  -> checkpoint/ + metrics.json
    sensitivity, and the allocator's cost table                     -> sensitivity/sensitivity.json, profile.json
    plans (one per requested budget or uniform width)               -> plans/<name>.json, .md; plans/frontier.*
    direct quantization, evaluated                                  -> results/<name>/direct.json
    QAT (optional), packed export                                   -> results/<name>/packed/, qat.json
    evaluation of the packed file                                   -> results/<name>/metrics.json
    report                                                          -> report.md

A run is described by a TOML file whose tables map one-to-one onto the stage configs (``[model]``,
``[finetune]``, ``[sensitivity]``, ``[allocate]``, ``[[plans]]``, ``[qat]``, ``[run]``); ``--set
section.key=value`` overrides one setting. Relative paths in the file resolve against the file's folder.

Caching by inputs: ``run.json`` keeps, per stage, a fingerprint of its inputs (the settings, the model's and the
data's fingerprints, upstream artifacts' hashes). A stage whose artifact exists and whose inputs are unchanged
(compared as recorded JSON; a setting added later with an unset ``None`` default is no change) is reused; one
whose inputs changed is recomputed, and so is everything downstream of it (their inputs hold its hash), and the
log says which setting changed. The ledger also keeps the SHA-256 of each stage's artifact files as written,
so an artifact edited or copied in from another run (a ``sensitivity/`` folder) is recomputed, never reused
under this run's settings; a ledger from before these hashes pins the files it finds on their first reuse.
Interrupting a run loses at most the stage in progress (the sensitivity stage keeps its finished draws);
``--force`` recomputes every stage, replacing only the files the stages write (a person's own files in the
run folder stay). Every input is checked before any cached artifact is dropped.

One run writes a folder at a time: ``run`` holds an exclusive lock (``.run.lock``, with its process id; an
``flock``, so the kernel releases it when the process ends, however it ends) and a second ``run`` on the same
folder refuses at once.

Under torch.distributed (``torchrun ... -m qbert_hessian run``) every rank runs the pipeline: fine-tuning and QAT
train with DDP, sensitivity shares its blocks or batches; rank 0 decides what is cached (and tells the others),
runs the light stages (plans, evaluations, export, report) and writes every file while the others wait. The
ranks read the fine-tuned checkpoint from the run folder, so on several hosts it must be on a shared filesystem
(as the Trainer's best-checkpoint reload needs anyway).
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import logging
import os
import re
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import distributed
from .artifacts import (
    BitPlan,
    QATLog,
    QuantProfile,
    RunRecord,
    SensitivityReport,
    StageResult,
    canonical,
    fingerprint,
    sha256_file,
)
from .config import (
    AllocConfig,
    CalibrationConfig,
    FinetuneConfig,
    Parallel,
    PlanSpec,
    SensitivityConfig,
    _Config,
    _typed,
)
from .errors import QBHError
from .qat import QATConfig

logger = logging.getLogger(__name__)

SECTIONS = ("out", "model", "finetune", "sensitivity", "allocate", "plans", "qat", "run")
RESERVED_PLAN_NAMES = ("frontier",)  # plans/frontier.json and .png are the frontier's
MAX_PLAN_NAME = 100  # a plan's files are <name>.json, <name>.md: well inside a file name's 255 bytes
LOCK_FILE = ".run.lock"
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
class RunConfig:
    """A whole run: the model and task, one config per stage, and the plans to make and evaluate."""

    model: ModelSpec
    finetune: FinetuneConfig
    sensitivity: SensitivityConfig
    allocate: AllocConfig
    plans: list[PlanSpec]
    qat: QATConfig
    run: RunSettings
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "model": self.model.to_dict(),
            "finetune": self.finetune.to_dict(),
            "sensitivity": self.sensitivity.to_dict(),
            "allocate": self.allocate.to_dict(),
            "plans": [{k: v for k, v in p.to_dict().items() if v is not None} for p in self.plans],
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
    m = _section(data, "model")
    for key in ("name", "task"):
        if key not in m:
            raise QBHError(f'[model] needs \'{key}\' (e.g. name = "minilm-l6", task = "sst2")')
    model = ModelSpec.from_dict(m)
    model = dataclasses.replace(model, name=_resolve(model.name, base_dir), data=_resolve(model.data, base_dir))
    out = data.get("out")
    if out is not None:
        out = _resolve(_typed("run", "out", out, str | None), base_dir)
    plans_raw = data.get("plans", [])
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
    config = RunConfig(
        model=model,
        finetune=FinetuneConfig.from_dict({"max_length": model.max_length, **_section(data, "finetune")}),
        sensitivity=SensitivityConfig.from_dict({"max_length": model.max_length, **_section(data, "sensitivity")}),
        allocate=AllocConfig.from_dict(_section(data, "allocate")),
        plans=plans,
        qat=QATConfig.from_dict(_section(data, "qat")),
        run=RunSettings.from_dict(_section(data, "run")),
        out=out,
    )
    for p in plans:
        p.alloc_config(config.allocate)  # every plan's settings on top of [allocate] are valid
        plan_qat_config(config.qat, p)  # ...and on top of [qat]
    return config


def plan_qat_config(qat: QATConfig, spec: PlanSpec) -> QATConfig:
    """``[qat]`` with the plan's own seed and recipe (distill, learn_scales), where it sets them."""
    over = {k: getattr(spec, k) for k in ("seed", "distill", "learn_scales") if getattr(spec, k) is not None}
    if not over:
        return qat
    try:
        return dataclasses.replace(qat, **over)
    except QBHError as exc:
        raise QBHError(f"plan '{spec.name}': {exc}") from None


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


def _changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """What differs between two :func:`~qbert_hessian.artifacts.canonical` values, as ``key: old -> new`` lines
    (numbers by value: ``epochs = 1`` and ``epochs = 1.0`` are one setting; ``true`` is not ``1``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changes(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list):
        same = len(old) == len(new) and not any(_changes(a, b) for a, b in zip(old, new))
    else:
        same = old == new and isinstance(old, bool) == isinstance(new, bool)
    return [] if same else [f"{prefix or 'value'}: {old!r} -> {new!r}"]


def _remove(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on a run folder: ``.run.lock`` holding the process id, locked with ``flock``.

    The kernel drops an ``flock`` when its process ends (exit, crash, signal), so a lock file left by a dead
    process is simply locked again; the file is removed on release. A folder the lock created is removed
    again if nothing else was written into it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder, self.path = folder, folder / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []  # the folders acquire made, innermost first

    def acquire(self) -> None:
        self._created = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._times = os.stat(self.folder)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise QBHError(
                    f"run folder '{self.folder}' is in use by another run (process {holder}); wait for it to "
                    "finish, or pass another --out"
                ) from None
            try:  # the holder before us may have removed the file between our open and our lock: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self, *, wrote: bool = True) -> None:
        """Unlock and remove the lock file; ``wrote=False`` (a run refused before its first write) also gives
        the folder back its times, so a refused run leaves the workspace exactly as it found it."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked, so no one locks the removed file
        os.close(self._fd)
        self._fd = None
        if not wrote and self.folder.exists():
            os.utime(self.folder, ns=(self._times.st_atime_ns, self._times.st_mtime_ns))
        for folder in self._created:
            if any(folder.iterdir()):
                break
            folder.rmdir()


class Run:
    """The stages of one run over ``out_dir``; each returns its artifact, computing it only when its recorded
    inputs differ from the current ones (or it is missing)."""

    def __init__(
        self, config: RunConfig, out_dir: Path | str, *, force: bool = False, progress: bool = True, device: str = "cpu"
    ) -> None:
        self.config, self.out, self.progress, self.device = config, Path(out_dir), progress, device
        if self.out.exists() and not self.out.is_dir():
            raise QBHError(f"run folder '{self.out}' is a file; pass a folder with --out")
        self.main, self.force = distributed.is_main(), force
        # rank 0 keeps the ledger: it decides what is cached and tells the others (see _agreed); --force starts
        # from an empty one, so every stage is recomputed and rewrites its own files (and nothing else)
        self.record = self._load_record() if self.main and not force else RunRecord(config={})
        self._artifacts: dict[str, tuple[Path, ...]] = {}
        self._writing = False
        self._raw: Any = None
        self._checkpoint: str | None = None
        self._fp32: Any = None
        self._task: Any = None
        self._fingerprints: dict[str, str] = {}
        self.recomputed: list[str] = []

    def _load_record(self) -> RunRecord:
        path = self.out / "run.json"
        if not path.exists():
            return RunRecord(config={})
        try:
            return RunRecord.load(path)
        except QBHError as exc:  # a run.json of an older version records no inputs: nothing is reused
            logger.info("run.json records no stage inputs (%s); every stage is recomputed", exc)
            return RunRecord(config={})

    # -- the ledger ----------------------------------------------------------------------------------------
    def _cached(self, key: str, inputs: dict[str, Any], *paths: Path) -> bool:
        """Whether stage ``key`` is reused: its recorded inputs equal ``inputs`` and its artifact files
        (``paths``) are the ones it wrote, by their SHA-256 in the ledger."""
        self._artifacts[key] = paths
        entry = self.record.stages.get(key)
        changed = _changes(canonical(entry.get("inputs")), canonical(inputs)) if entry is not None else []
        if entry is not None and not changed and all(p.is_file() for p in paths):
            found = self._hashes(paths)
            recorded = entry.get("artifacts")
            if recorded is None:
                # A ledger written before artifact hashes: its inputs match, so the files found now are taken as
                # the ones it wrote and pinned from here on (the alternative, recomputing every stage of every
                # older run, would also retrain its QAT models).
                entry["artifacts"] = found
                self.record.save(self.out / "run.json")
                return True
            if recorded == found:
                return True
            edited = sorted(k for k in set(recorded) | set(found) if recorded.get(k) != found.get(k))
            changed = [f"{', '.join(edited)} is not the file this run wrote (edited or copied in)"]
        if entry is not None:
            logger.info("stage %s: inputs changed (%s); recomputing", key, "; ".join(changed[:4]) or "artifact missing")
        self.recomputed.append(key)
        return False

    def _hashes(self, paths: Sequence[Path]) -> dict[str, str]:
        return {p.relative_to(self.out).as_posix(): sha256_file(p) for p in paths}

    def _agreed(self, key: str, inputs: Any, *paths: Path) -> bool:
        """:meth:`_cached` decided by rank 0 and told to every rank (for the stages every rank takes part in)."""
        hit = distributed.broadcast_object(self._cached(key, inputs, *paths) if self.main else None)
        if not hit and not self.main:
            self.recomputed.append(key)
        return hit

    def _done(self, key: str, inputs: dict[str, Any], *paths: Path) -> None:
        """Record stage ``key``'s inputs and the SHA-256 of its artifact files (those its cache check named,
        unless ``paths`` are given)."""
        if not self.main:
            return
        paths = paths or self._artifacts.get(key, ())
        entry = {"hash": fingerprint(inputs), "inputs": inputs, "artifacts": self._hashes(paths)}
        self.record.stages[key] = entry
        self.record.save(self.out / "run.json")

    def _fp(self, what: str, compute: Any) -> str:
        if what not in self._fingerprints:
            self._fingerprints[what] = compute()
        return self._fingerprints[what]

    # -- shared inputs -------------------------------------------------------------------------------------
    def raw(self):
        from .tasks import dev_subset, load_raw_task

        if self._raw is None:
            m = self.config.model
            raw = load_raw_task(m.task, data_dir=m.data, text_columns=m.text_columns, label_column=m.label_column)
            self._raw = dev_subset(raw, m.max_eval_samples, self.config.run.seed)
        return self._raw

    def _head_labels(self) -> None:
        """Number the data's labels as the checkpoint's head does (matched by name), or refuse."""
        from .models import load_config
        from .stages import head_labels

        self._raw = head_labels(self.raw(), load_config(self.checkpoint()), self.checkpoint())

    def data_fp(self) -> str:
        from .stages import data_fingerprint

        return self._fp("data", lambda: data_fingerprint(self.raw()))

    def model_fp(self) -> str:
        """The fingerprint of the FP32 checkpoint every later stage uses."""
        from .stages import model_fingerprint

        return self._fp("checkpoint", lambda: model_fingerprint(self.checkpoint()))

    def fp32(self):
        """The fine-tuned FP32 model and its tokenized task (loaded once)."""
        from .models import load_model
        from .tasks import tokenize_task

        if self._fp32 is None:
            self._head_labels()  # the task numbered as the checkpoint's head, however the run was entered
            raw = self.raw()
            model, tokenizer = load_model(
                self.checkpoint(),
                task_family=raw.family,
                num_labels=len(raw.label_names),
                eager=True,
                device=self.device,
            )
            self._fp32 = model
            self._task = tokenize_task(self.raw(), tokenizer, max_length=self.config.model.max_length)
        return self._fp32, self._task

    # -- stages --------------------------------------------------------------------------------------------
    def checkpoint(self) -> str:
        """The FP32 baseline: the given model if it has a trained head of the task's family (sequence, token or
        QA), else fine-tune one once. Decided on the first call (which every rank makes in step: the decision is
        a collective) and remembered."""
        if self._checkpoint is None:
            self._checkpoint = self._baseline_checkpoint()
        return self._checkpoint

    def _baseline_checkpoint(self) -> str:
        from . import stages
        from .models import is_classifier, load_config

        name = self.config.model.name
        load_config(name)
        if is_classifier(name, self.raw().family):
            return name
        ckpt = self.out / "checkpoint"
        cfg = self.config.finetune
        inputs = None
        if self.main:
            inputs = {
                "model": self._fp("base", lambda: stages.model_fingerprint(name)),
                "data": self.data_fp(),
                "config": cfg.to_dict(),
            }
        if self._agreed("finetune", inputs, ckpt / "metrics.json", ckpt / "model.safetensors"):
            return str(ckpt)
        if self.main and (self.record.stages.get("finetune") is not None or (ckpt / "metrics.json").exists()):
            _remove(ckpt)  # another model, data or settings: its Trainer checkpoints must not be resumed
        distributed.barrier()
        logger.info("stage finetune: %s on %s -> %s", name, self.config.model.task, ckpt)
        stages.finetune(name, self.raw(), cfg, ckpt, device=self.device, resume=True, progress=self.progress)
        self._done("finetune", inputs)  # type: ignore[arg-type]
        return str(ckpt)

    def _profile_groups(self) -> list[int | str]:
        from .quant.profile import DEFAULT_PROFILE_GROUPS

        groups = {*DEFAULT_PROFILE_GROUPS, self.config.allocate.groups}
        groups |= {p.groups for p in self.config.plans if p.groups is not None}
        return sorted(groups, key=str)

    def sensitivity(self) -> tuple[SensitivityReport | None, QuantProfile | None]:
        """The report and its cost table (on rank 0; the other ranks take part in computing the report and get
        ``(None, None)``)."""
        from . import stages

        out = self.out / "sensitivity"
        path, prof_path = out / "sensitivity.json", out / stages.PROFILE_FILE
        inputs = p_inputs = None
        if self.main:
            config = self.config.sensitivity.protocol()
            inputs = {"model": self.model_fp(), "data": self.data_fp(), "config": config}
            p_inputs = {
                "model": inputs["model"],
                "groups": [str(g) for g in self._profile_groups()],
                "range_method": self.config.allocate.range_method,
            }
        if not self._agreed("sensitivity", inputs, path):
            return self._compute_sensitivity(inputs, p_inputs)
        if not self.main:
            return None, None
        assert inputs is not None and p_inputs is not None
        report = SensitivityReport.load(path)
        if self._cached("profile", p_inputs, prof_path):
            return report, QuantProfile.load(prof_path)
        model, _ = self.fp32()
        profile = stages.report_profile(
            model,
            report,
            out,
            groups=self._profile_groups(),
            model_name=self.config.model.name,
            model_fp=inputs["model"],
            range_method=self.config.allocate.range_method,
        )
        self._done("profile", p_inputs)
        return report, profile

    def _compute_sensitivity(
        self, inputs: dict[str, Any] | None, p_inputs: dict[str, Any] | None
    ) -> tuple[SensitivityReport | None, QuantProfile | None]:
        from . import stages
        from .sensitivity import draw_indices

        out = self.out / "sensitivity"
        path = out / "sensitivity.json"
        # every input check the stage makes comes before anything cached is dropped
        model, task = self.fp32()
        draw_indices(len(task.train), self.config.sensitivity)
        stages.check_state_file(out)
        previous = None
        if self.main:
            previous = SensitivityReport.load(path) if path.exists() and not self.force else None
            if previous is None or previous.complete or previous.inputs != inputs:
                previous = None  # made from other inputs: start afresh (a partial one of these inputs resumes)
                for f in (out / name for name in stages.SENSITIVITY_FILES):
                    if f.is_file() or f.is_symlink():  # its own files only: a person's files there stay
                        f.unlink()
        # rank 0's partial report and fingerprints, so every rank resumes the same blocks
        previous, made_from = distributed.broadcast_object(
            (previous, {"model": inputs["model"], "data": inputs["data"]} if inputs else None)
        )
        logger.info("stage sensitivity -> %s", out)
        report, profile = stages.sensitivity(
            model,
            task,
            self.config.sensitivity,
            out,
            model_name=self.config.model.name,
            inputs=made_from,
            resume=previous,
            profile_groups=self._profile_groups(),
            range_method=self.config.allocate.range_method,
            progress=self.progress,
        )
        self._done("sensitivity", inputs)  # type: ignore[arg-type]
        self._done("profile", p_inputs, out / stages.PROFILE_FILE)  # type: ignore[arg-type]
        return (report, profile) if self.main else (None, None)

    def plans(self, report: SensitivityReport, profile: QuantProfile) -> dict[str, BitPlan]:
        """Every plan of the run (rank 0's work)."""
        from . import stages

        out = self.out / "plans"
        upstream = {
            "sensitivity": stages.file_fingerprint(self.out / "sensitivity" / "sensitivity.json"),
            "profile": stages.file_fingerprint(self.out / "sensitivity" / stages.PROFILE_FILE),
            "allocate": self.config.allocate.protocol(),
        }
        source = {"sensitivity": "sensitivity/sensitivity.json", "profile": "sensitivity/profile.json", **upstream}
        priced = self._priced_profiles(report)
        plans = {}
        for spec in self.config.plans:
            path = out / f"{spec.name}.json"
            table, mine, inputs = self._plan_table(spec.alloc_config(self.config.allocate), profile, priced, source)
            inputs = {**upstream, **inputs, "spec": spec.to_dict()}
            if self._cached(f"plan:{spec.name}", inputs, path):
                plans[spec.name] = BitPlan.load(path)
                continue
            plan = stages.make_plan(report, table, spec, self.config.allocate, source=mine)
            stages.write_plan(plan, path)
            self._done(f"plan:{spec.name}", inputs)
            plans[spec.name] = plan
        if self.config.run.frontier:
            table, _, extra = self._plan_table(self.config.allocate, profile, priced, source)
            f_inputs = {**upstream, **extra}
            if not self._cached("frontier", f_inputs, out / "frontier.json", out / "frontier.png"):
                mixed = next((p for p in plans.values() if p.method == "milp"), None)
                stages.write_frontier(report, table, self.config.allocate, out, mixed)
                self._done("frontier", f_inputs)
        return plans

    def _plan_table(
        self, config: AllocConfig, profile: QuantProfile, priced: dict[Path, QuantProfile], source: dict[str, Any]
    ) -> tuple[QuantProfile, dict[str, Any], dict[str, Any]]:
        """The cost table a plan of ``config`` is made from, its plan's ``source`` and the cache inputs it adds
        (none for omega and trace, so run folders made before priced measures match)."""
        from . import stages

        if not config.measure.priced:
            return profile, source, {}
        path = stages.priced_profile_path(self.out / "sensitivity", config)
        fp = stages.file_fingerprint(path)
        return priced[path], {**source, "profile": f"sensitivity/{path.name}", "priced": fp}, {"priced": fp}

    def _priced_profiles(self, report: SensitivityReport) -> dict[Path, QuantProfile]:
        """The priced cost tables the run's plans ask for (measure ``quadratic`` or ``measured``), one per measure,
        rounding and GPTQ settings, over the widths and groupings of every plan using it; each a cached stage."""
        from . import stages

        out = self.out / "sensitivity"
        configs = [p.alloc_config(self.config.allocate) for p in self.config.plans]
        if self.config.run.frontier:
            configs.append(self.config.allocate)
        wanted: dict[Path, tuple[AllocConfig, set[int], set[int | str]]] = {}
        for c in configs:
            if c.measure.priced:
                _, bits, groups = wanted.setdefault(stages.priced_profile_path(out, c), (c, set(), set()))
                bits.update(c.bits)
                groups.add(c.groups)
        tables = {}
        for path, (c, bits, groups) in wanted.items():
            gptq = c.rounding == "gptq"
            inputs = {
                "sensitivity": stages.file_fingerprint(out / "sensitivity.json"),
                "model": self.model_fp(),
                "data": self.data_fp(),
                "measure": c.measure.value,
                "rounding": c.rounding,
                "range_method": c.range_method,
                "bits": sorted(bits),
                "groups": sorted(map(str, groups)),
                **(
                    {"gptq": c.gptq_config().to_dict(), "calibration": self.config.run.calibration.to_dict()}
                    if gptq
                    else {}
                ),
            }
            key = f"profile:{path.stem.removeprefix('profile-')}"
            if self._cached(key, inputs, path):
                tables[path] = QuantProfile.load(path)
                continue
            model, task = self.fp32()
            logger.info("stage %s -> %s", key, path)
            tables[path] = stages.priced_profile(
                model,
                task,
                report,
                c,
                out,
                calibration=self.config.run.calibration,
                bits=sorted(bits),
                groups=sorted(groups, key=str),
                model_name=self.config.model.name,
                model_fp=self.model_fp(),
                progress=self.progress,
            )
            self._done(key, inputs)
        return tables

    def baseline(self) -> StageResult:
        from .evaluate import evaluate
        from .export import fp32_safetensors_bytes

        path = self.out / "results" / "fp32.json"
        inputs = {**self._base_inputs(), **self._scoring()}
        if self._cached("fp32", inputs, path):
            return StageResult.load(path)
        model, task = self.fp32()
        nbytes = fp32_safetensors_bytes(model)
        metrics = evaluate(model, task)
        result = StageResult(stage="fp32", metrics=metrics, family=task.family, bytes=nbytes, inputs=inputs)
        result.save(path)
        self._done("fp32", inputs)
        return result

    def evaluate_plan(self, spec: PlanSpec, plan: BitPlan) -> StageResult | None:
        """Direct quantization, then (optionally) QAT, export and evaluation from the packed file.

        Every rank takes part in QAT; rank 0 alone evaluates, exports and writes (the others return None).
        """
        from . import stages
        from .qat import train_qat
        from .quant.apply import sync_activation_ranges

        name = spec.name
        qat = self.config.run.qat if spec.qat is None else spec.qat
        out = self.out / "results" / name
        qat_config = self.qat_config(spec)
        d_inputs = p_inputs = None
        q = None  # the directly quantized model, built once and reused by QAT and export
        direct: dict[str, Any] = {}
        if self.main:
            d_inputs = {
                **self._base_inputs(),
                "plan": stages.file_fingerprint(self.out / "plans" / f"{name}.json"),
                "range_method": plan.range_method,  # in the plan too; named so the log says what changed
                # likewise, only away from nearest, so run folders made before roundings were a setting match
                **({"rounding": plan.rounding, "gptq": plan.gptq} if plan.rounding != "nearest" else {}),
                "calibration": self.config.run.calibration.to_dict(),
            }
            p_inputs = {**d_inputs, "qat": qat_config.to_dict() if qat else None}
            if qat and qat_config.eval_steps > 0:  # the dev score picks the kept checkpoint: scoring is an input
                p_inputs = {**p_inputs, **self._scoring()}
            d_inputs = {**d_inputs, **self._scoring()}  # how it is scored: not an input of the packed model
            q, direct = self._direct(name, plan, d_inputs)
        packed = out / "packed"
        training: QATLog | None = None
        if not self._agreed(f"packed:{name}", p_inputs, packed / "quantization.json", packed / stages.WEIGHTS_FILE):
            model, task = self.fp32()
            q = q if q is not None else self._quantize(model, plan, task)
            if qat:
                logger.info("stage QAT: %s", name)
                log = train_qat(
                    q,
                    self._qat_task(task, qat_config),
                    qat_config,
                    work_dir=out / "trainer",
                    teacher=model,
                    progress=self.progress,
                )
                training = QATLog(**log)
            else:
                sync_activation_ranges(q)  # every rank exports what rank 0 does (they calibrated alike)
            if self.main:
                if training is not None:
                    training.save(out / "qat.json")
                else:
                    (out / "qat.json").unlink(missing_ok=True)
                stages.export(q, plan, packed, fp32=model, tokenizer=task.tokenizer)
            distributed.barrier()  # the packed checkpoint is complete before any rank goes on
            self._done(f"packed:{name}", p_inputs)  # type: ignore[arg-type]
        if not self.main:
            return None
        result = self._metrics(spec, plan, qat, direct, training, d_inputs, p_inputs)  # type: ignore[arg-type]
        if "onnx" in self.config.run.export:
            self._onnx(spec, plan)
        return result

    def _onnx(self, spec: PlanSpec, plan: BitPlan) -> StageResult:
        """The packed checkpoint as ONNX Runtime serves it (int8 compute), and its scores from that file."""
        from . import stages
        from .deploy.onnx import ONNX_FILE, export_onnx
        from .deploy.runtime import evaluate_onnx

        out = self.out / "results" / spec.name
        folder, path = out / "onnx", out / "onnx.json"
        e_inputs = {"packed": stages.file_fingerprint(out / "packed" / stages.WEIGHTS_FILE), "mode": "int8"}
        if not self._cached(f"onnx:{spec.name}", e_inputs, folder / ONNX_FILE):
            logger.info("stage ONNX export: %s", spec.name)
            export_onnx(out / "packed", folder, force=True)  # replaces only an earlier export
            self._done(f"onnx:{spec.name}", e_inputs)
        s_inputs = {**self._base_inputs(), "onnx": stages.file_fingerprint(folder / ONNX_FILE), **self._scoring()}
        if self._cached(f"onnx-metrics:{spec.name}", s_inputs, path):
            return StageResult.load(path)
        _, task = self.fp32()
        result = StageResult(
            stage="onnx",
            plan=spec.name,
            metrics=evaluate_onnx(folder, task, progress=self.progress),
            family=task.family,
            bytes=(folder / ONNX_FILE).stat().st_size,
            predicted_bytes=plan.predicted["bytes"] if plan.predicted.get("deploy") == "onnx" else None,
            inputs={**s_inputs, "export": e_inputs},
        )
        result.save(path)
        self._done(f"onnx-metrics:{spec.name}", s_inputs)
        return result

    def _base_inputs(self) -> dict[str, Any]:
        return {"model": self.model_fp(), "data": self.data_fp(), "max_length": self.config.model.max_length}

    def _scoring(self) -> dict[str, str]:
        """How an evaluation stage scores, where it changed: NER on the full gold (every word of every dev
        sentence, in windows) instead of the words inside max_length. Entered only for token tasks, so the
        metrics of other tasks stay cached; the packed and QAT stages see it only when QAT keeps its best dev
        checkpoint (``eval_steps``), where the score chooses the weights."""
        return {"scoring": "full-gold"} if self.raw().family == "token" else {}

    def _direct(self, name: str, plan: BitPlan, d_inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The directly quantized model (None when its metrics are cached) and its metrics (rank 0's work)."""
        from .evaluate import evaluate

        direct_path = self.out / "results" / name / "direct.json"
        if self._cached(f"direct:{name}", d_inputs, direct_path):
            return None, StageResult.load(direct_path).metrics
        model, task = self.fp32()
        logger.info("stage direct quantization: %s", name)
        q = self._quantize(model, plan, task)
        direct = evaluate(q, task)
        StageResult(stage="direct", metrics=direct, family=task.family, plan=name, inputs=d_inputs).save(direct_path)
        self._done(f"direct:{name}", d_inputs)
        return q, direct

    def _quantize(self, model: Any, plan: BitPlan, task: Any) -> Any:
        from . import stages

        return stages.quantize_direct(model, plan, task, self.config.run.calibration, progress=self.progress)

    def _metrics(
        self,
        spec: PlanSpec,
        plan: BitPlan,
        qat: bool,
        direct: dict[str, Any],
        training: QATLog | None,
        d_inputs: dict[str, Any],
        p_inputs: dict[str, Any],
    ) -> StageResult:
        """The packed checkpoint evaluated (rank 0's work)."""
        from . import stages
        from .evaluate import evaluate
        from .export import file_sizes, load_packed

        out = self.out / "results" / spec.name
        packed = out / "packed"
        if training is None and qat and (out / "qat.json").exists():
            training = QATLog.load(out / "qat.json")
        final = out / "metrics.json"
        m_inputs = {
            **self._base_inputs(),
            "packed": stages.file_fingerprint(packed / stages.WEIGHTS_FILE),
            **self._scoring(),
        }
        if self._cached(f"metrics:{spec.name}", m_inputs, final):
            return StageResult.load(final)
        _, task = self.fp32()
        result = StageResult(
            stage="qat" if qat else "direct",
            plan=spec.name,
            metrics=evaluate(load_packed(packed, device=self.device), task),
            family=task.family,
            direct=direct,
            bytes=file_sizes(packed)["weights_bytes"],
            predicted_bytes=plan.predicted_packed_bytes,
            qat=qat,
            train_seconds=training.train_seconds if training else None,
            examples_seen=training.examples_seen if training else None,
            inputs={**m_inputs, "direct": d_inputs, "export": p_inputs},
        )
        result.save(final)
        self._done(f"metrics:{spec.name}", m_inputs)
        return result

    def qat_config(self, spec: PlanSpec) -> QATConfig:
        """``[qat]`` with the plan's own seed and recipe (:func:`plan_qat_config`)."""
        return plan_qat_config(self.config.qat, spec)

    def _qat_task(self, task, cfg: QATConfig):
        from .tasks import subset, tokenize_task

        if cfg.max_train_samples is None:
            return task
        raw = subset(self.raw(), cfg.max_train_samples, cfg.seed)
        return tokenize_task(raw, task.tokenizer, max_length=self.config.model.max_length)

    def execute(self) -> Path:
        """Every stage, then ``report.md``, the folder locked against another run meanwhile; returns the
        report's path (on every rank; rank 0 writes it)."""
        lock = RunLock(self.out) if self.main else None
        refused = None
        if lock is not None:
            try:
                lock.acquire()
            except QBHError as exc:
                refused = str(exc)
        refused = distributed.broadcast_object(refused)  # every rank of a refused job stops, not only rank 0
        if refused is not None:
            raise QBHError(refused)
        try:
            return self._execute()
        finally:
            if lock is not None:
                lock.release(wrote=self._writing)

    def _check_inputs(self) -> None:
        """What the stages would refuse (the data, the model and its tokenizer, the head against the task),
        checked before any stage drops a cached artifact."""
        from .models import is_classifier, load_model

        raw = self.raw()
        name = self.config.model.name
        if is_classifier(name, raw.family):
            self.fp32()  # the model every stage uses, loaded as they load it
        else:  # the base model a new head is fine-tuned on
            load_model(
                name,
                task_family=raw.family,
                num_labels=len(raw.label_names),
                label_names=raw.label_names,
                eager=False,
                new_head=True,
            )

    def _execute(self) -> Path:
        from .report import write_run_report

        self._check_inputs()
        if "onnx" in self.config.run.export:
            from .deploy.output import require

            require("onnx", "onnxruntime")  # a missing extra fails before anything is written too
        self._writing = True  # from here on the stages may write
        self.checkpoint()
        self._head_labels()  # so do labels the checkpoint's head names otherwise
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.record.config = self.config.to_dict()
            self.record.save(self.out / "run.json")
        report, profile = self.sensitivity()
        plans = None
        if self.main:
            self.baseline()
            assert report is not None and profile is not None
            plans = self.plans(report, profile)
        plans = distributed.broadcast_object(plans)
        for spec in self.config.plans:
            self.evaluate_plan(spec, plans[spec.name])
        path = self.out / "report.md"
        if self.main:
            if self.recomputed:
                logger.info("recomputed: %s", ", ".join(self.recomputed))
            else:
                logger.info("every stage's inputs are unchanged; nothing was recomputed")
            path = write_run_report(self.out)
        distributed.barrier()
        return path


# The offline default behind `qbert-hessian demo` / `make demo`: MiniLM-L6 on BBC News (5 topics, 1,780 training
# and 445 dev articles), sized to finish in about ten minutes on 2 CPU cores.
DEMO_CONFIG: dict[str, Any] = {
    "model": {"name": "minilm-l6", "task": "bbc-news", "max_length": 96},
    "finetune": {"epochs": 2, "batch_size": 16, "lr": 1e-4},
    "sensitivity": {"draws": 3, "batch_size": 16, "trace_samples": 2},
    "allocate": {"groups": 128, "bits": [2, 3, 4, 8]},
    "plans": [
        {"name": "uniform-4", "uniform": 4, "qat": False},
        {"name": "uniform-2", "uniform": 2},
        {"name": "mixed-2.5", "avg_bits": 2.5, "bits": [2, 3]},
    ],
    "qat": {"epochs": 1, "batch_size": 16, "lr": 1e-4, "distill": True},
    "run": {"calibration_batches": 4, "batch_size": 16},
}
