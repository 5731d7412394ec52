"""``qbert-hessian run``: every stage in order, each writing its artifact and skipped when the artifact exists.

    finetune (unless the model already is a fine-tuned classifier)  -> checkpoint/ + metrics.json
    sensitivity                                                     -> sensitivity/sensitivity.json (+ csv, md, png)
    plans (one per requested budget or uniform width)               -> plans/<name>.json, .md; plans/frontier.*
    direct quantization, evaluated                                  -> results/<name>/direct.json
    QAT (optional), packed export                                   -> results/<name>/packed/, qat.json
    evaluation of the packed file                                   -> results/<name>/metrics.json
    report                                                          -> report.md

A run is described by a TOML file whose tables map one-to-one onto the stage configs (``[model]``,
``[finetune]``, ``[sensitivity]``, ``[allocate]``, ``[[plans]]``, ``[qat]``, ``[run]``); ``--set
section.key=value`` overrides one setting. Interrupting a run loses at most the stage in progress (the
sensitivity stage keeps its finished blocks); rerunning continues where it stopped, ``--force`` redoes all.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

from .allocate import AllocConfig, Budget, allocate_bits, frontier, uniform_plan
from .artifacts import (
    METRICS_SCHEMA,
    QAT_SCHEMA,
    RUN_SCHEMA,
    BitPlan,
    SensitivityReport,
    read_json,
    write_json,
    write_text,
)
from .config import FinetuneConfig, SensitivityConfig, check_bits
from .errors import QBHError
from .qat import QATConfig

logger = logging.getLogger(__name__)

SECTIONS = ("out", "model", "finetune", "sensitivity", "allocate", "plans", "qat", "run")
MODEL_KEYS = ("name", "task", "data", "text_columns", "label_column", "max_length")
PLAN_KEYS = (
    "name",
    "uniform",
    "avg_bits",
    "budget_mb",
    "ratio",
    "qat",
    *(f.name for f in dataclasses.fields(AllocConfig)),
)
RUN_KEYS = ("qat", "calibration_batches", "batch_size", "seed", "frontier")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: the model and task, one config per stage, and the plans to make and evaluate."""

    model: dict[str, Any]
    finetune: FinetuneConfig
    sensitivity: SensitivityConfig
    allocate: dict[str, Any]
    plans: list[dict[str, Any]]
    qat: QATConfig
    run: dict[str, Any]
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "model": self.model,
            "finetune": self.finetune.to_dict(),
            "sensitivity": self.sensitivity.to_dict(),
            "allocate": self.allocate,
            "plans": self.plans,
            "qat": self.qat.to_dict(),
            "run": self.run,
        }


def _check_keys(where: str, data: Mapping[str, Any], valid: Sequence[str]) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise QBHError(f"unknown key(s) {', '.join(unknown)} in [{where}]; valid keys are {', '.join(valid)}")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``section.key=value`` settings on top of a config dict (values parsed as TOML, else strings)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise QBHError(f"--set '{item}' is not section.key=value (e.g. --set sensitivity.draws=5)")
        if section not in SECTIONS or section in ("out", "plans"):
            raise QBHError(
                f"--set '{item}': unknown section '{section}'; use model, finetune, sensitivity, allocate, qat, run"
            )
        data.setdefault(section, {})[name] = _parse_value(value.strip())
    return data


def parse_run_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a run config dict (from TOML) into a :class:`RunConfig`; errors name the bad key."""
    _check_keys("top level", data, SECTIONS)
    model = dict(data.get("model", {}))
    _check_keys("model", model, MODEL_KEYS)
    for key in ("name", "task"):
        if key not in model:
            raise QBHError(f'[model] needs \'{key}\' (e.g. name = "minilm-l6", task = "sst2")')
    model.setdefault("max_length", 128)
    alloc = dict(data.get("allocate", {}))
    AllocConfig.from_dict(alloc)  # validates
    plans = [dict(p) for p in data.get("plans", [])]
    if not plans:
        raise QBHError('the run has no [[plans]]; add e.g. [[plans]] name = "uniform-4" uniform = 4')
    names = set()
    for p in plans:
        _check_keys(f"plans.{p.get('name', '?')}", p, PLAN_KEYS)
        if "name" not in p or not str(p["name"]).replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise QBHError(
                f"every [[plans]] entry needs a name of letters, digits, '-', '_' or '.'; got {p.get('name')!r}"
            )
        if p["name"] in names:
            raise QBHError(f"plan name '{p['name']}' is used twice; names must be unique")
        names.add(p["name"])
        kinds = [k for k in ("uniform", "avg_bits", "budget_mb", "ratio") if k in p]
        if len(kinds) != 1:
            raise QBHError(f"plan '{p['name']}' needs exactly one of uniform, avg_bits, budget_mb, ratio")
        if "uniform" in p:
            check_bits(p["uniform"], f"plan '{p['name']}': uniform bits")
        else:
            Budget(max_mb=p.get("budget_mb"), ratio=p.get("ratio"), avg_bits=p.get("avg_bits"))
        AllocConfig.from_dict({**alloc, **{k: v for k, v in p.items() if k in AllocConfig.__dataclass_fields__}})
    run = {"qat": True, "calibration_batches": 8, "batch_size": 32, "seed": 0, "frontier": True, **data.get("run", {})}
    _check_keys("run", run, RUN_KEYS)
    return RunConfig(
        model=model,
        finetune=FinetuneConfig.from_dict({"max_length": model["max_length"], **data.get("finetune", {})}),
        sensitivity=SensitivityConfig.from_dict({"max_length": model["max_length"], **data.get("sensitivity", {})}),
        allocate=alloc,
        plans=plans,
        qat=QATConfig.from_dict(data.get("qat", {})),
        run=run,
        out=data.get("out"),
    )


def load_run_config(path: Path | str, overrides: Sequence[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise QBHError(f"config file '{path}' does not exist; pass a TOML file (see experiments/sst2_minilm.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise QBHError(f"'{path}' is not valid TOML ({exc}); fix the file") from None
    return parse_run_config(apply_overrides(data, overrides))


class Run:
    """The stages of one run over ``out_dir``; each stage returns its artifact, computing it only if missing."""

    def __init__(self, config: RunConfig, out_dir: Path | str, *, force: bool = False, progress: bool = True) -> None:
        self.config, self.out, self.progress = config, Path(out_dir), progress
        if force and self.out.exists():
            for child in ("checkpoint", "sensitivity", "plans", "results", "report.md"):
                target = self.out / child
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self._raw: Any = None
        self._fp32: Any = None
        self._task: Any = None

    # -- shared inputs -------------------------------------------------------------------------------------
    def raw(self):
        from .tasks import load_raw_task

        if self._raw is None:
            m = self.config.model
            self._raw = load_raw_task(
                m["task"],
                data_dir=m.get("data"),
                text_columns=m.get("text_columns"),
                label_column=m.get("label_column"),
            )
        return self._raw

    def fp32(self):
        """The fine-tuned FP32 model and its tokenized task (loaded once)."""
        from .models import load_model
        from .tasks import tokenize_task

        if self._fp32 is None:
            model, tokenizer = load_model(self.checkpoint(), num_labels=len(self.raw().label_names), eager=True)
            self._fp32 = model
            self._task = tokenize_task(self.raw(), tokenizer, max_length=self.config.model["max_length"])
        return self._fp32, self._task

    # -- stages --------------------------------------------------------------------------------------------
    def checkpoint(self) -> str:
        """The FP32 baseline: the given model if it is a fine-tuned classifier, else fine-tune it once."""
        from .models import is_classifier, load_config, load_model
        from .tasks import subset, tokenize_task
        from .train import finetune

        name = self.config.model["name"]
        load_config(name)
        if is_classifier(name):
            return name
        ckpt = self.out / "checkpoint"
        if (ckpt / "metrics.json").exists():
            return str(ckpt)
        logger.info("stage finetune: %s on %s -> %s", name, self.config.model["task"], ckpt)
        cfg = self.config.finetune
        raw = subset(self.raw(), cfg.max_train_samples, cfg.seed)
        model, tokenizer = load_model(name, num_labels=len(raw.label_names), label_names=raw.label_names, eager=False)
        finetune(
            model,
            tokenize_task(raw, tokenizer, max_length=cfg.max_length),
            cfg,
            ckpt,
            model_name=name,
            resume=True,
            progress=self.progress,
        )
        return str(ckpt)

    def sensitivity(self) -> SensitivityReport:
        from .hessian.sensitivity import estimate_sensitivity
        from .quant.apply import report_profile
        from .report import write_sensitivity

        out = self.out / "sensitivity"
        path = out / "sensitivity.json"
        previous = SensitivityReport.load(path) if path.exists() else None
        if previous is not None and previous.complete and previous.quantization is not None:
            return previous
        model, task = self.fp32()
        logger.info("stage sensitivity -> %s", out)
        report = estimate_sensitivity(
            model,
            task,
            self.config.sensitivity,
            model_name=self.config.model["name"],
            resume=previous,
            on_block=lambda r: write_sensitivity(r, out),
            progress=self.progress,
        )
        groups = {1, "heads", 128, "channel", self.config.allocate.get("groups", 128)}
        groups |= {p["groups"] for p in self.config.plans if "groups" in p}
        report.quantization = report_profile(model, [b.name for b in report.blocks], groups=sorted(groups, key=str))
        write_sensitivity(report, out)
        return report

    def plans(self) -> dict[str, BitPlan]:
        from .report import plan_markdown, plot_frontier

        report = self.sensitivity()
        out = self.out / "plans"
        source = {"sensitivity": "sensitivity/sensitivity.json"}
        plans = {}
        for spec in self.config.plans:
            path = out / f"{spec['name']}.json"
            if path.exists():
                plans[spec["name"]] = BitPlan.load(path)
                continue
            cfg = AllocConfig.from_dict(
                {**self.config.allocate, **{k: v for k, v in spec.items() if k in AllocConfig.__dataclass_fields__}}
            )
            if "uniform" in spec:
                plan = uniform_plan(report, int(spec["uniform"]), cfg, source=source)
            else:
                budget = Budget(max_mb=spec.get("budget_mb"), ratio=spec.get("ratio"), avg_bits=spec.get("avg_bits"))
                plan = allocate_bits(report, budget, cfg, source=source)
            plan.save(path)
            write_text(path.with_suffix(".md"), plan_markdown(plan))
            plans[spec["name"]] = plan
        if self.config.run["frontier"] and not (out / "frontier.png").exists():
            cfg = AllocConfig.from_dict(self.config.allocate)
            front = frontier(report, dataclasses.replace(cfg, method="milp"))
            write_json(out / "frontier.json", front)
            mixed = next((p for p in plans.values() if p.method == "milp"), None)
            plot_frontier(front, out / "frontier.png", mixed)
        return plans

    def _calibrated(self, plan: BitPlan):
        from .quant.apply import quantize_calibrated

        model, task = self.fp32()
        r = self.config.run
        return quantize_calibrated(
            model, plan, task, num_batches=r["calibration_batches"], batch_size=r["batch_size"], seed=r["seed"]
        )

    def baseline(self) -> dict[str, Any]:
        from .evaluate import evaluate

        path = self.out / "results" / "fp32.json"
        if path.exists():
            return read_json(path, METRICS_SCHEMA)
        model, task = self.fp32()
        state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        result = {"schema": METRICS_SCHEMA, "stage": "fp32", "metrics": evaluate(model, task), "bytes": state_bytes}
        write_json(path, result)
        return result

    def evaluate_plan(self, name: str, plan: BitPlan, qat: bool) -> dict[str, Any]:
        """Direct quantization, then (optionally) QAT, export and evaluation from the packed file."""
        from .evaluate import evaluate
        from .export import file_sizes, load_packed, save_packed
        from .qat import train_qat

        out = self.out / "results" / name
        final = out / "metrics.json"
        if final.exists():
            return read_json(final, METRICS_SCHEMA)
        model, task = self.fp32()
        direct_path = out / "direct.json"
        q = None  # the directly quantized model, built once and reused by QAT and export
        if direct_path.exists():
            direct = read_json(direct_path, METRICS_SCHEMA)["metrics"]
        else:
            logger.info("stage direct quantization: %s", name)
            q = self._calibrated(plan)
            direct = evaluate(q, task)
            write_json(direct_path, {"schema": METRICS_SCHEMA, "stage": "direct", "metrics": direct})
        packed = out / "packed"
        training = None
        if not (packed / "quantization.json").exists():
            q = q if q is not None else self._calibrated(plan)
            if qat:
                logger.info("stage QAT: %s", name)
                from .tasks import subset, tokenize_task

                cfg = self.config.qat
                train_task = task
                if cfg.max_train_samples is not None:
                    train_task = tokenize_task(
                        subset(self.raw(), cfg.max_train_samples, cfg.seed),
                        task.tokenizer,
                        max_length=self.config.model["max_length"],
                    )
                training = train_qat(
                    q, train_task, cfg, work_dir=out / "trainer", teacher=model, progress=self.progress
                )
                write_json(out / "qat.json", {"schema": QAT_SCHEMA, **training})
            save_packed(q, packed, tokenizer=task.tokenizer)
        if training is None and (out / "qat.json").exists():
            training = read_json(out / "qat.json", QAT_SCHEMA)
        reloaded = load_packed(packed)
        metrics = evaluate(reloaded, task)
        result = {
            "schema": METRICS_SCHEMA,
            "stage": "qat" if qat else "direct",
            "plan": name,
            "metrics": metrics,
            "direct": direct,
            "bytes": file_sizes(packed)["weights_bytes"],
            "predicted_bytes": plan.predicted.get("bytes"),
            "qat": qat,
            "train_seconds": training["train_seconds"] if training else None,
        }
        write_json(final, result)
        return result

    def execute(self) -> Path:
        """Every stage, then ``report.md``; returns the report's path."""
        from .report import write_run_report

        self.baseline()  # loads the model and the data first: bad input fails before anything is written
        write_json(self.out / "run.json", {"schema": RUN_SCHEMA, "config": self.config.to_dict()})
        plans = self.plans()
        for spec in self.config.plans:
            qat = bool(spec.get("qat", self.config.run["qat"]))
            self.evaluate_plan(spec["name"], plans[spec["name"]], qat)
        return write_run_report(self.out)


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
