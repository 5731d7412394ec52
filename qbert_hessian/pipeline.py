"""``qbert-hessian run``: every stage in order, each reused only while the inputs that made it are unchanged.

    finetune (unless the model already has the task family's head)  -> checkpoint/ + metrics.json
    sensitivity, and the allocator's cost table                     -> sensitivity/sensitivity.json, profile.json
    plans (one per requested budget or uniform width)               -> plans/<name>.json, .md; plans/frontier.*
    direct quantization, evaluated                                  -> results/<name>/direct.json
    QAT (optional), packed export                                   -> results/<name>/packed/, qat.json
    evaluation of the packed file                                   -> results/<name>/metrics.json
    report                                                          -> report.md

The run's settings come from its TOML file, parsed and checked by ``run_config.py`` (every plan resolved there).

Caching by inputs: ``run.json`` keeps, per stage, a fingerprint of its inputs (the settings, the model's and the
data's fingerprints, upstream artifacts' hashes). A stage whose artifact exists and whose inputs are unchanged
(compared as recorded JSON; a setting added later with an unset ``None`` default is no change) is reused; one
whose inputs changed is recomputed, and so is everything downstream of it (their inputs hold its hash), and the
log says which setting changed. The ledger also keeps the SHA-256 of each stage's artifact files as written,
so an artifact edited or copied in from another run (a ``sensitivity/`` folder) is recomputed, never reused
under this run's settings; a ledger from before these hashes pins the files it finds on their first reuse.
Every stage goes through one helper, :meth:`Run._stage`, which owns this ledger.
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

import dataclasses
import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
from .config import AllocConfig, QATConfig, check_calib_samples, without_unrecorded
from .errors import QBHError
from .run_config import ResolvedPlan, RunConfig
from .run_folder import RunFolder

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
T = TypeVar("T")


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


@dataclasses.dataclass(frozen=True)
class Stage:
    """One entry of the ledger: the stage's key in ``run.json``, its inputs (None off rank 0, which alone keeps the
    ledger) and the artifact files whose SHA-256 the ledger keeps."""

    key: str
    inputs: dict[str, Any] | None
    paths: tuple[Path, ...]


class Run:
    """The stages of one run over ``out_dir``; each returns its artifact, computing it only when its recorded
    inputs differ from the current ones (or it is missing)."""

    def __init__(
        self, config: RunConfig, out_dir: Path | str, *, force: bool = False, progress: bool = True, device: str = "cpu"
    ) -> None:
        self.config, self.out, self.progress, self.device = config, Path(out_dir), progress, device
        self.files = RunFolder(self.out)  # where each stage's files live (the report reads the same layout)
        if self.out.exists() and not self.out.is_dir():
            raise QBHError(f"run folder '{self.out}' is a file; pass a folder with --out")
        self.main, self.force = distributed.is_main(), force
        # rank 0 keeps the ledger: it decides what is cached and tells the others (see _agreed); --force starts
        # from an empty one, so every stage is recomputed and rewrites its own files (and nothing else)
        self.record = self._load_record() if self.main and not force else RunRecord(config={})
        self._writing = False
        self._raw: Any = None
        self._checkpoint: str | None = None
        self._fp32: Any = None
        self._task: Any = None
        self._fingerprints: dict[str, str] = {}
        self.recomputed: list[str] = []

    def _load_record(self) -> RunRecord:
        path = self.files.ledger
        if not path.exists():
            return RunRecord(config={})
        try:
            return RunRecord.load(path)
        except QBHError as exc:  # a run.json of an older version records no inputs: nothing is reused
            logger.info("run.json records no stage inputs (%s); every stage is recomputed", exc)
            return RunRecord(config={})

    # -- the ledger ----------------------------------------------------------------------------------------
    def _stage(
        self,
        stage: Stage,
        compute: Callable[[], T],
        load: Callable[[], T] | None = None,
        *,
        every_rank: bool = False,
        also: tuple[Stage, ...] = (),
    ) -> T | None:
        """Stage ``stage`` through the ledger: ``load()`` it when it is reused (its recorded inputs equal the
        current ones and its files are the ones it wrote), else ``compute()`` it and record its inputs and the
        SHA-256 of its files, and of the stages in ``also`` that the same computation writes.

        ``every_rank``: every rank takes part in computing it, rank 0 deciding for all (rank 0 alone runs the
        other stages). Returns what ``load`` or ``compute`` returns (None for a reused stage without ``load``).
        """
        if self._agreed(stage) if every_rank else self._cached(stage):
            return load() if load is not None else None
        value = compute()
        for done in (stage, *also):
            self._done(done)
        return value

    def _cached(self, stage: Stage) -> bool:
        """Whether ``stage`` is reused: its recorded inputs equal ``stage.inputs`` and its artifact files are the
        ones it wrote, by their SHA-256 in the ledger."""
        key, paths = stage.key, stage.paths
        entry = self.record.stages.get(key)
        changed = _changes(canonical(entry.get("inputs")), canonical(stage.inputs)) if entry is not None else []
        if entry is not None and not changed and all(p.is_file() for p in paths):
            found = self._hashes(paths)
            recorded = entry.get("artifacts")
            if recorded is None:
                # A ledger written before artifact hashes: its inputs match, so the files found now are taken as
                # the ones it wrote and pinned from here on (the alternative, recomputing every stage of every
                # older run, would also retrain its QAT models).
                entry["artifacts"] = found
                self.record.save(self.files.ledger)
                return True
            if recorded == found:
                return True
            edited = sorted(k for k in set(recorded) | set(found) if recorded.get(k) != found.get(k))
            changed = [f"{', '.join(edited)} is not the file this run wrote (edited or copied in)"]
        if entry is not None:
            logger.info("stage %s: inputs changed (%s); recomputing", key, "; ".join(changed[:4]) or "artifact missing")
        self.recomputed.append(key)
        return False

    def _hashes(self, paths: tuple[Path, ...]) -> dict[str, str]:
        return {p.relative_to(self.out).as_posix(): sha256_file(p) for p in paths}

    def _agreed(self, stage: Stage) -> bool:
        """:meth:`_cached` decided by rank 0 and told to every rank (for the stages every rank takes part in)."""
        hit = distributed.broadcast_object(self._cached(stage) if self.main else None)
        if not hit and not self.main:
            self.recomputed.append(stage.key)
        return hit

    def _done(self, stage: Stage) -> None:
        """Record ``stage``'s inputs and the SHA-256 of its artifact files (rank 0)."""
        if not self.main:
            return
        inputs = stage.inputs
        entry = {"hash": fingerprint(inputs), "inputs": inputs, "artifacts": self._hashes(stage.paths)}
        self.record.stages[stage.key] = entry
        self.record.save(self.files.ledger)

    def _on_main(self, build: Callable[[], T]) -> T | None:
        """``build()`` on rank 0, which keeps the ledger (a stage's inputs); None on the other ranks."""
        return build() if self.main else None

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

    def _base_inputs(self) -> dict[str, Any]:
        return {"model": self.model_fp(), "data": self.data_fp(), "max_length": self.config.model.max_length}

    def _scoring(self) -> dict[str, str]:
        """How an evaluation stage scores, where it changed: NER on the full gold (every word of every dev
        sentence, in windows) instead of the words inside max_length. Entered only for token tasks, so the
        metrics of other tasks stay cached; the packed and QAT stages see it only when QAT keeps its best dev
        checkpoint (``eval_steps``), where the score chooses the weights."""
        return {"scoring": "full-gold"} if self.raw().family == "token" else {}

    # -- the FP32 baseline ---------------------------------------------------------------------------------
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
        ckpt = self.files.checkpoint
        cfg = self.config.finetune
        inputs = self._on_main(
            lambda: {
                "model": self._fp("base", lambda: stages.model_fingerprint(name)),
                "data": self.data_fp(),
                "config": cfg.to_dict(),
            }
        )

        def finetune() -> None:
            if self.main and (self.record.stages.get("finetune") is not None or (ckpt / "metrics.json").exists()):
                _remove(ckpt)  # another model, data or settings: its Trainer checkpoints must not be resumed
            distributed.barrier()
            logger.info("stage finetune: %s on %s -> %s", name, self.config.model.task, ckpt)
            stages.finetune(name, self.raw(), cfg, ckpt, device=self.device, resume=True, progress=self.progress)

        stage = Stage("finetune", inputs, (ckpt / "metrics.json", ckpt / "model.safetensors"))
        self._stage(stage, finetune, every_rank=True)
        return str(ckpt)

    def baseline(self) -> StageResult:
        """The FP32 model's scores and size (rank 0's work)."""
        path = self.files.fp32
        stage = Stage("fp32", {**self._base_inputs(), **self._scoring()}, (path,))
        return self._stage(stage, lambda: self._score_fp32(stage), load=lambda: StageResult.load(path))

    def _score_fp32(self, stage: Stage) -> StageResult:
        from .evaluate import evaluate
        from .export import fp32_safetensors_bytes

        model, task = self.fp32()
        nbytes = fp32_safetensors_bytes(model)
        metrics = evaluate(model, task)
        result = StageResult(stage="fp32", metrics=metrics, family=task.family, bytes=nbytes, inputs=stage.inputs)
        result.save(stage.paths[0])
        return result

    # -- sensitivity and the cost table --------------------------------------------------------------------
    def _profile_groups(self) -> list[int | str]:
        from .quant.profile import DEFAULT_PROFILE_GROUPS

        groups = {*DEFAULT_PROFILE_GROUPS, self.config.allocate.groups, *(p.alloc.groups for p in self.config.plans)}
        return sorted(groups, key=str)

    def sensitivity(self) -> tuple[SensitivityReport | None, QuantProfile | None]:
        """The report and its cost table (on rank 0; the other ranks take part in computing the report and get
        ``(None, None)``)."""
        inputs = self._on_main(
            lambda: {"model": self.model_fp(), "data": self.data_fp(), "config": self.config.sensitivity.protocol()}
        )
        p_inputs = self._on_main(
            lambda: {
                "model": self.model_fp(),
                "groups": [str(g) for g in self._profile_groups()],
                "range_method": self.config.allocate.range_method,
            }
        )
        report = Stage("sensitivity", inputs, (self.files.sensitivity_report,))
        profile = Stage("profile", p_inputs, (self.files.profile,))  # written with the report, or alone
        return self._stage(
            report,
            lambda: self._compute_sensitivity(report),
            load=lambda: self._reused_sensitivity(report, profile),
            every_rank=True,
            also=(profile,),
        )

    def _reused_sensitivity(
        self, report: Stage, profile: Stage
    ) -> tuple[SensitivityReport | None, QuantProfile | None]:
        """A reused report and its cost table, measured again where only the table's own inputs changed."""
        if not self.main:
            return None, None
        sens = SensitivityReport.load(report.paths[0])
        return sens, self._stage(
            profile, lambda: self._measure_profile(sens, profile), load=lambda: QuantProfile.load(profile.paths[0])
        )

    def _measure_profile(self, report: SensitivityReport, stage: Stage) -> QuantProfile:
        from . import stages

        assert stage.inputs is not None
        model, _ = self.fp32()
        return stages.report_profile(
            model,
            report,
            self.files.sensitivity,
            groups=self._profile_groups(),
            model_name=self.config.model.name,
            model_fp=stage.inputs["model"],
            range_method=self.config.allocate.range_method,
        )

    def _compute_sensitivity(self, stage: Stage) -> tuple[SensitivityReport | None, QuantProfile | None]:
        from . import stages
        from .sensitivity import draw_indices

        out, inputs = self.files.sensitivity, stage.inputs
        path = stage.paths[0]
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
        return (report, profile) if self.main else (None, None)

    # -- plans ---------------------------------------------------------------------------------------------
    def plans(self, report: SensitivityReport, profile: QuantProfile) -> dict[str, BitPlan]:
        """Every plan of the run, and the frontier (rank 0's work)."""
        from . import stages

        upstream = {
            "sensitivity": stages.file_fingerprint(self.files.sensitivity_report),
            "profile": stages.file_fingerprint(self.files.profile),
            "allocate": self.config.allocate.protocol(),
        }
        where = {"sensitivity": self.files.sensitivity_report, "profile": self.files.profile}
        source = {**{k: f.relative_to(self.out).as_posix() for k, f in where.items()}, **upstream}
        priced = self._priced_profiles(report)
        plans = {p.name: self._plan(p, report, profile, priced, upstream, source) for p in self.config.plans}
        if self.config.run.frontier:
            mixed = next((p for p in plans.values() if p.method == "milp"), None)
            allocate = self.config.allocate
            table, _, extra = self._plan_table(allocate, profile, priced, source)
            files = (self.files.frontier_data, self.files.frontier_figure)
            stage = Stage("frontier", {**upstream, **extra}, files)
            self._stage(stage, lambda: stages.write_frontier(report, table, allocate, self.files.plans, mixed))
        return plans

    def _plan_table(
        self, config: AllocConfig, profile: QuantProfile, priced: dict[Path, QuantProfile], source: dict[str, Any]
    ) -> tuple[QuantProfile, dict[str, Any], dict[str, Any]]:
        """The cost table a plan of ``config`` is made from, its plan's ``source`` and the cache inputs it adds
        (none for omega and trace, so run folders made before priced measures match)."""
        from . import stages

        if not config.measure.priced:
            return profile, source, {}
        path = stages.priced_profile_path(self.files.sensitivity, config)
        fp = stages.file_fingerprint(path)
        mine = {**source, "profile": path.relative_to(self.out).as_posix(), "priced": fp}
        return priced[path], mine, {"priced": fp}

    def _priced_profiles(self, report: SensitivityReport) -> dict[Path, QuantProfile]:
        """The priced cost tables the run's plans ask for (measure ``quadratic`` or ``measured``), one per measure,
        rounding and GPTQ settings, over the widths and groupings of every plan using it; each a cached stage."""
        from . import stages

        out = self.files.sensitivity
        configs = [p.alloc for p in self.config.plans]
        if self.config.run.frontier:
            configs.append(self.config.allocate)
        wanted: dict[Path, tuple[AllocConfig, set[int], set[int | str]]] = {}
        for c in configs:
            if c.measure.priced:
                _, bits, groups = wanted.setdefault(stages.priced_profile_path(out, c), (c, set(), set()))
                bits.update(c.bits)
                groups.add(c.groups)
        return {path: self._priced_profile(report, path, *w) for path, w in wanted.items()}

    def _priced_profile(
        self, report: SensitivityReport, path: Path, c: AllocConfig, bits: set[int], groups: set[int | str]
    ) -> QuantProfile:
        """One priced cost table (``path``) over ``bits`` and ``groups``, through the ledger."""
        from . import stages

        gptq = c.rounding == "gptq"
        inputs = {
            "sensitivity": stages.file_fingerprint(self.files.sensitivity_report),
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

        def compute() -> QuantProfile:
            model, task = self.fp32()
            logger.info("stage %s -> %s", key, path)
            return stages.priced_profile(
                model,
                task,
                report,
                c,
                path.parent,
                calibration=self.config.run.calibration,
                bits=sorted(bits),
                groups=sorted(groups, key=str),
                model_name=self.config.model.name,
                model_fp=self.model_fp(),
                progress=self.progress,
            )

        return self._stage(Stage(key, inputs, (path,)), compute, load=lambda: QuantProfile.load(path))

    def _plan(
        self,
        plan: ResolvedPlan,
        report: SensitivityReport,
        profile: QuantProfile,
        priced: dict[Path, QuantProfile],
        upstream: dict[str, Any],
        source: dict[str, Any],
    ) -> BitPlan:
        from . import stages

        path = self.files.plan(plan.name)
        table, mine, extra = self._plan_table(plan.alloc, profile, priced, source)

        def make() -> BitPlan:
            bitplan = stages.make_plan(report, table, plan, source=mine)
            stages.write_plan(bitplan, path)
            return bitplan

        stage = Stage(f"plan:{plan.name}", {**upstream, **extra, "spec": plan.spec.to_dict()}, (path,))
        return self._stage(stage, make, load=lambda: BitPlan.load(path))

    # -- a plan's models -----------------------------------------------------------------------------------
    def evaluate_plan(self, plan: ResolvedPlan, bitplan: BitPlan) -> StageResult | None:
        """Direct quantization, then (optionally) QAT, export and evaluation from the packed file.

        Every rank takes part in QAT; rank 0 alone evaluates, exports and writes (the others return None).
        """
        from . import stages

        d_inputs, p_inputs = self._on_main(lambda: self._plan_inputs(plan, bitplan)) or (None, None)
        # the directly quantized model (None when its metrics are cached), reused by QAT and export
        q, direct = self._direct(plan, bitplan, d_inputs) if self.main else (None, {})
        packed = self.files.packed(plan.name)
        stage = Stage(f"packed:{plan.name}", p_inputs, (packed / "quantization.json", packed / stages.WEIGHTS_FILE))
        training = self._stage(stage, lambda: self._pack(plan, bitplan, q), every_rank=True)
        if not self.main:
            return None
        assert d_inputs is not None and p_inputs is not None
        result = self._metrics(plan, bitplan, direct, training, {"direct": d_inputs, "export": p_inputs})
        if "onnx" in self.config.run.export:
            self._onnx(plan, bitplan)
        return result

    def _plan_inputs(self, plan: ResolvedPlan, bitplan: BitPlan) -> tuple[dict[str, Any], dict[str, Any]]:
        """The inputs of a plan's direct quantization and of its packed model."""
        from . import stages

        rounding = without_unrecorded({"rounding": bitplan.rounding})
        d_inputs = {
            **self._base_inputs(),
            "plan": stages.file_fingerprint(self.files.plan(plan.name)),
            "range_method": bitplan.range_method,  # in the plan too; named so the log says what changed
            # likewise the rounding and the activation range, as every record holds them (left out at the values
            # of folders made before they were settings, so those match and a GPTQ plan never matches them), and
            # only where they change the numbers: GPTQ's whole table goes with gptq rounding, and the range counts
            # only where activations are quantized
            **({**rounding, "gptq": bitplan.gptq} if rounding else {}),
            **without_unrecorded({"act_range": bitplan.act_range} if bitplan.act_bits else {}),
            "calibration": self.config.run.calibration.to_dict(),
        }
        p_inputs = {**d_inputs, "qat": plan.qat.to_dict() if plan.qat is not None else None}
        if plan.qat is not None and plan.qat.eval_steps > 0:  # the dev score picks the kept checkpoint: an input
            p_inputs = {**p_inputs, **self._scoring()}
            if plan.qat.group_by_length and self.raw().family in ("token", "qa"):
                # scored in the dataset's order: before, length-grouped dev batches paired these scores' rows with
                # the wrong sentences, so a model kept then was chosen on noise and is trained again
                p_inputs["eval_order"] = "dataset"
        d_inputs = {**d_inputs, **self._scoring()}  # how it is scored: not an input of the packed model
        return d_inputs, p_inputs

    def _direct(self, plan: ResolvedPlan, bitplan: BitPlan, d_inputs: Any) -> tuple[Any, dict[str, Any]]:
        """The directly quantized model (None when its metrics are cached) and its metrics (rank 0's work)."""
        path = self.files.direct(plan.name)
        stage = Stage(f"direct:{plan.name}", d_inputs, (path,))
        return self._stage(
            stage, lambda: self._score_direct(plan, bitplan, stage), load=lambda: (None, StageResult.load(path).metrics)
        )

    def _score_direct(self, plan: ResolvedPlan, bitplan: BitPlan, stage: Stage) -> tuple[Any, dict[str, Any]]:
        from .evaluate import evaluate

        model, task = self.fp32()
        logger.info("stage direct quantization: %s", plan.name)
        q = self._quantize(model, bitplan, task)
        direct = evaluate(q, task)
        result = StageResult(stage="direct", metrics=direct, family=task.family, plan=plan.name, inputs=stage.inputs)
        result.save(stage.paths[0])
        return q, direct

    def _quantize(self, model: Any, bitplan: BitPlan, task: Any) -> Any:
        from . import stages

        return stages.quantize_direct(model, bitplan, task, self.config.run.calibration, progress=self.progress)

    def _pack(self, plan: ResolvedPlan, bitplan: BitPlan, q: Any) -> QATLog | None:
        """QAT (when the plan trains) on every rank, then rank 0 exports the packed checkpoint; returns the
        training log."""
        from . import stages
        from .qat import train_qat
        from .quant.apply import sync_activation_ranges

        files, name = self.files, plan.name
        model, task = self.fp32()
        q = q if q is not None else self._quantize(model, bitplan, task)
        training: QATLog | None = None
        if plan.qat is not None:
            logger.info("stage QAT: %s", plan.name)
            qat_task = self._qat_task(task, plan.qat)
            work_dir = files.results(name) / "trainer"
            log = train_qat(q, qat_task, plan.qat, work_dir=work_dir, teacher=model, progress=self.progress)
            training = QATLog(**log)
        else:
            sync_activation_ranges(q)  # every rank exports what rank 0 does (they calibrated alike)
        if self.main:
            if training is not None:
                training.save(files.qat_log(name))
            else:
                files.qat_log(name).unlink(missing_ok=True)
            stages.export(q, bitplan, files.packed(name), fp32=model, tokenizer=task.tokenizer)
        distributed.barrier()  # the packed checkpoint is complete before any rank goes on
        return training

    def _qat_task(self, task, cfg: QATConfig):
        from .tasks import subset, tokenize_task

        if cfg.max_train_samples is None:
            return task
        raw = subset(self.raw(), cfg.max_train_samples, cfg.seed)
        return tokenize_task(raw, task.tokenizer, max_length=self.config.model.max_length)

    def _metrics(
        self,
        plan: ResolvedPlan,
        bitplan: BitPlan,
        direct: dict[str, Any],
        training: QATLog | None,
        upstream: dict[str, Any],
    ) -> StageResult:
        """The packed checkpoint evaluated (rank 0's work); ``upstream``: the direct and export stages' inputs,
        kept in the result."""
        from . import stages

        path = self.files.metrics(plan.name)
        inputs = {
            **self._base_inputs(),
            "packed": stages.file_fingerprint(self.files.packed(plan.name) / stages.WEIGHTS_FILE),
            **self._scoring(),
        }
        stage = Stage(f"metrics:{plan.name}", inputs, (path,))
        return self._stage(
            stage,
            lambda: self._score_packed(plan, bitplan, direct, training, {**inputs, **upstream}),
            load=lambda: StageResult.load(path),
        )

    def _score_packed(
        self,
        plan: ResolvedPlan,
        bitplan: BitPlan,
        direct: dict[str, Any],
        training: QATLog | None,
        inputs: dict[str, Any],
    ) -> StageResult:
        from .evaluate import evaluate
        from .export import file_sizes, load_packed

        packed, log = self.files.packed(plan.name), self.files.qat_log(plan.name)
        qat = plan.qat is not None
        if training is None and qat and log.exists():
            training = QATLog.load(log)
        _, task = self.fp32()
        result = StageResult(
            stage="qat" if qat else "direct",
            plan=plan.name,
            metrics=evaluate(load_packed(packed, device=self.device), task),
            family=task.family,
            direct=direct,
            bytes=file_sizes(packed)["weights_bytes"],
            predicted_bytes=bitplan.predicted_packed_bytes,
            qat=qat,
            train_seconds=training.train_seconds if training else None,
            examples_seen=training.examples_seen if training else None,
            inputs=inputs,
        )
        result.save(self.files.metrics(plan.name))
        if training is not None:
            from .qat import kept_score_mismatch

            problem = kept_score_mismatch(training.best_metric, result.metrics, task.family)
            if problem:
                logger.warning("plan '%s': %s", plan.name, problem)
        return result

    def _onnx(self, plan: ResolvedPlan, bitplan: BitPlan) -> StageResult:
        """The packed checkpoint as ONNX Runtime serves it (int8 compute), and its scores from that file."""
        from . import stages
        from .deploy.onnx import ONNX_FILE, export_onnx

        packed = self.files.packed(plan.name)
        folder, path = self.files.onnx(plan.name), self.files.onnx_metrics(plan.name)

        def export() -> None:
            logger.info("stage ONNX export: %s", plan.name)
            export_onnx(packed, folder, force=True)  # replaces only an earlier export

        e_inputs = {"packed": stages.file_fingerprint(packed / stages.WEIGHTS_FILE), "mode": "int8"}
        self._stage(Stage(f"onnx:{plan.name}", e_inputs, (folder / ONNX_FILE,)), export)
        s_inputs = {**self._base_inputs(), "onnx": stages.file_fingerprint(folder / ONNX_FILE), **self._scoring()}
        stage = Stage(f"onnx-metrics:{plan.name}", s_inputs, (path,))
        return self._stage(
            stage, lambda: self._score_onnx(plan, bitplan, stage, e_inputs), load=lambda: StageResult.load(path)
        )

    def _score_onnx(self, plan: ResolvedPlan, bitplan: BitPlan, stage: Stage, e_inputs: dict[str, Any]) -> StageResult:
        from .deploy.onnx import ONNX_FILE
        from .deploy.runtime import evaluate_onnx

        folder = self.files.onnx(plan.name)
        _, task = self.fp32()
        result = StageResult(
            stage="onnx",
            plan=plan.name,
            metrics=evaluate_onnx(folder, task, progress=self.progress),
            family=task.family,
            bytes=(folder / ONNX_FILE).stat().st_size,
            predicted_bytes=bitplan.predicted["bytes"] if bitplan.predicted.get("deploy") == "onnx" else None,
            inputs={**stage.inputs, "export": e_inputs},  # type: ignore[dict-item]
        )
        result.save(stage.paths[0])
        return result

    # -- the whole run -------------------------------------------------------------------------------------
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
        self._check_calibration(raw)

    def _check_calibration(self, raw: Any) -> None:
        """A plan rounded by GPTQ (the default) calibrates on that many training sequences: one asking for more
        than the training split holds is refused before any stage runs, not after the sensitivity stage. (A
        classification or token example is one sequence; a QA example can make several windows, so QA is checked
        when the sequences are drawn.)"""
        if raw.family == "qa":
            return
        n = len(raw.train_labels)
        allocate = self.config.allocate
        named = [(f"plan '{p.name}'", p.alloc) for p in self.config.plans]
        if self.config.run.frontier and allocate.measure.priced:  # the frontier's priced table is rounded too
            named.append(("[allocate]", allocate))
        for what, c in named:
            if c.rounding == "gptq":
                check_calib_samples(c.calib_samples, n, what=what, fix="keys")

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
            self.record.save(self.files.ledger)
        report, profile = self.sensitivity()
        plans = None
        if self.main:
            self.baseline()
            assert report is not None and profile is not None
            plans = self.plans(report, profile)
        plans = distributed.broadcast_object(plans)
        for plan in self.config.plans:
            self.evaluate_plan(plan, plans[plan.name])
        path = self.files.report
        if self.main:
            if self.recomputed:
                logger.info("recomputed: %s", ", ".join(self.recomputed))
            else:
                logger.info("every stage's inputs are unchanged; nothing was recomputed")
            path = write_run_report(self.out, self.config.plans)
        distributed.barrier()
        return path
