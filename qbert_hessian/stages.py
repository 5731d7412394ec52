"""The pipeline's stages as library functions: each takes configs and live objects, writes its artifacts
atomically and returns them. ``cli/`` (one command per stage), ``pipeline.Run`` (every stage, cached by
inputs) and the notebooks call these same functions, so a stage behaves the same whichever way it is reached.

Every artifact records ``inputs``: fingerprints of what made it (the model's weights, the task's data, the
settings, upstream artifacts' hashes), so a cached or resumed stage can tell stale work from reusable work.

Under torch.distributed (torchrun) every rank calls the same stage; the work is shared (sensitivity,
landscapes, density, fine-tuning) and rank 0 alone writes the artifacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import distributed
from .allocate import MIB, AllocConfig, allocate_bits, frontier, uniform_plan
from .artifacts import (
    BitPlan,
    DensityReport,
    Evaluation,
    QuantProfile,
    SensitivityReport,
    SizeReport,
    atomic_write,
    fingerprint,
    sha256_file,
    write_text,
)
from .config import (
    DEFAULT_RANGE_METHOD,
    CalibrationConfig,
    DensityConfig,
    GPTQConfig,
    PlanSpec,
    Precision,
    SensitivityConfig,
    check_act_range,
    check_range_method,
    check_rounding,
)
from .errors import QBHError
from .models import BlockMap, resolve_model_path
from .packed_format import WEIGHTS_FILE
from .quant.profile import (
    DEFAULT_PROFILE_GROUPS,
    check_groups,
    measure_priced_profile,
    measure_profile,
    profile_units,
)
from .run_config import ResolvedPlan, resolve_plan
from .run_folder import PROFILE_FILE

if TYPE_CHECKING:
    from torch import nn

    from .tasks import RawTask, Task

logger = logging.getLogger(__name__)
# The draws a stopped sensitivity run has finished, for --resume (removed once its blocks are finished).
SENSITIVITY_STATE_FILE = "sensitivity.state.pt"
# Every file the sensitivity stage writes in its folder (a run drops these, and only these, to start it over).
SENSITIVITY_FILES = (
    "sensitivity.json",
    "sensitivity.csv",
    "sensitivity.md",
    "sensitivity.png",
    PROFILE_FILE,
    SENSITIVITY_STATE_FILE,
)


def check_state_file(out_dir: Path | str) -> None:
    """The place of the resume state in ``out_dir`` holds a file or nothing (a folder there would stop the
    first saved draw)."""
    path = Path(out_dir) / SENSITIVITY_STATE_FILE
    if path.exists() and not path.is_file():
        raise QBHError(f"'{path}' is a folder, where sensitivity keeps its finished draws; move it away and rerun")


# ----------------------------------------------------------------------------------------------- fingerprints


def model_fingerprint(name_or_path: str | Path) -> str:
    """A hash of a model's files (config and weights) when it is a local folder or alias; the name otherwise."""
    path = Path(resolve_model_path(str(name_or_path)))
    if not path.is_dir():
        return f"hub:{name_or_path}"
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin") and p.is_file())
    for f in files:
        if f.name.startswith(("trainer_state", "training_args", "metrics", "size")):
            continue
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]


def data_fingerprint(raw: RawTask) -> str:
    """A hash of a task's family, texts, labels and label names (both splits).

    The family (how the data is tokenized, which head and loss it trains, how it is scored) enters for token
    and QA tasks only, so the fingerprints of classification data, and the runs cached on them, are the same
    as before task families existed.
    """
    h = hashlib.sha256()
    if raw.family != "classification":
        h.update(f"family={raw.family}".encode())
    for part in (raw.train_texts, raw.train_labels, raw.dev_texts, raw.dev_labels, raw.label_names):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def file_fingerprint(path: Path | str) -> str:
    return sha256_file(path)[:16]


# ------------------------------------------------------------------------------------------------ sensitivity


def finetune(
    model_name: str,
    raw: Any,
    config: Any,
    out_dir: Path | str,
    *,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    max_eval_samples: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_name`` with a new head of the task's family on the seeded subset ``config`` names; the
    checkpoint and ``metrics.json`` go to ``out_dir``. Returns the metrics record.

    The head's label order is the data's (:mod:`~qbert_hessian.tasks.labels`), or the base model's own when it
    already has a trained head of the family naming the same labels. ``max_eval_samples`` scores the
    checkpoint on a subset of that many dev examples, drawn with ``config.seed`` (recorded in the metrics).
    """
    from .models import head_family, load_config, load_model
    from .tasks import dev_subset, match_labels, subset, tokenize_task
    from .tasks.labels import head_names
    from .train import finetune as train

    recorded = eval_subset(max_eval_samples, config.seed)
    base = load_config(model_name)
    names = head_names(getattr(base, "id2label", None), len(raw.label_names))
    if head_family(base.architectures) == raw.family and names and set(names) == set(raw.label_names):
        raw = match_labels(raw, base.id2label, model_name)  # keep the trained head's meaning
    raw = subset(raw, config.max_train_samples, config.seed)
    raw = dev_subset(raw, max_eval_samples, config.seed)
    model, tokenizer = load_model(
        model_name,
        task_family=raw.family,
        num_labels=len(raw.label_names),
        label_names=raw.label_names,
        eager=False,
        device=device,
        new_head=True,
    )
    task = tokenize_task(raw, tokenizer, max_length=config.max_length)
    return train(
        model,
        task,
        config,
        out_dir,
        model_name=model_name,
        resume=resume,
        progress=progress,
        eval_subset=recorded,
    )


def eval_subset(max_eval_samples: int | None, seed: int) -> dict[str, int]:
    """What a result records of a dev subset (nothing when the whole dev split is scored)."""
    if max_eval_samples is None:
        return {}
    if max_eval_samples < 1:
        raise QBHError(f"--max-eval-samples must be at least 1, got {max_eval_samples}")
    return {"max_eval_samples": max_eval_samples, "eval_seed": seed}


def evaluate_models(
    model_name: str,
    raw: Any,
    *,
    plans: Sequence[tuple[str, BitPlan]] = (),
    packed: Sequence[Path | str] = (),
    onnx: Sequence[Path | str] = (),
    calibration: CalibrationConfig | None = None,
    max_length: int = 128,
    device: str = "cpu",
    max_eval_samples: int | None = None,
    eval_seed: int = 0,
) -> Evaluation:
    """Dev metrics of a model (FP32 or packed), of its direct quantization under each plan, of packed
    checkpoints and of ONNX exports (scored by ONNX Runtime from the file), each with its size in MiB (file bytes;
    the plan's prediction for a direct quantization).

    ``max_eval_samples`` scores every model on the same subset of that many dev examples, drawn with
    ``eval_seed``; each row records both."""
    from .evaluate import evaluate
    from .export import file_sizes, fp32_safetensors_bytes, is_packed
    from .tasks import dev_subset

    subset_info = eval_subset(max_eval_samples, eval_seed)
    onnx_models = [_onnx_model(p, raw) for p in onnx]  # refuse a folder that is not an export before any work
    raw = dev_subset(raw, max_eval_samples, eval_seed)
    for p in packed:
        if not is_packed(p):
            raise QBHError(f"'{p}' is not a packed checkpoint (no quantization.json); export one with quantize")
    if plans and is_packed(model_name):
        raise QBHError("--plan needs an FP32 --model; pass the fine-tuned checkpoint, not a packed one")
    model, task = load_for_task(model_name, raw, max_length=max_length, eager=False, device=device)
    if is_packed(model_name):
        rows = [{"name": str(model_name), "kind": "packed", "size_mib": file_sizes(model_name)["weights_bytes"] / MIB}]
    else:
        rows = [{"name": "fp32", "kind": "fp32", "size_mib": fp32_safetensors_bytes(model) / MIB}]
    rows[0].update(evaluate(model, task))
    for path, plan in plans:
        qmodel = quantize_direct(model, plan, task, calibration or CalibrationConfig())
        size = plan.predicted_packed_bytes  # the packed model's (a plan priced for ONNX predicts that file too)
        rows.append({"name": str(path), "kind": "direct", "size_mib": size and size / MIB, **evaluate(qmodel, task)})
    for p in packed:
        qmodel, ptask = load_for_task(p, raw, max_length=max_length, eager=False, device=device)
        rows.append({"name": str(p), "kind": "packed", "size_mib": file_sizes(p)["weights_bytes"] / MIB})
        rows[-1].update(evaluate(qmodel, ptask))
    for p, om in zip(onnx, onnx_models):
        from .deploy.runtime import evaluate_onnx
        from .models import load_config
        from .tasks import tokenize_task

        oraw = head_labels(raw, load_config(str(p)), str(p))  # the export's head numbers the labels by name
        otask = tokenize_task(oraw, om.tokenizer, max_length=max_length)
        rows.append({"name": str(p), "kind": f"onnx-{om.mode}", "size_mib": om.file_bytes / MIB})
        rows[-1].update(evaluate_onnx(om, otask))
    for row in rows:
        row.update(subset_info)
    return Evaluation(task=raw.name, results=rows)


def _onnx_model(path: Path | str, raw: RawTask) -> Any:
    """The ONNX export at ``path`` (``deploy.runtime.OnnxModel``), its head checked against the task."""
    from .deploy.runtime import OnnxModel

    model = OnnxModel(path)
    if model.family != raw.family:
        raise QBHError(
            f"ONNX export '{path}' has a {model.family} head but task '{raw.name}' is a {raw.family} task; "
            "export the model fine-tuned on this task"
        )
    if model.id2label and len(model.id2label) != len(raw.label_names):
        raise QBHError(
            f"ONNX export '{path}' has a {len(model.id2label)}-label head but task '{raw.name}' has "
            f"{len(raw.label_names)} labels; export the model fine-tuned on this task"
        )
    return model


def sensitivity(
    model: nn.Module,
    task: Task,
    config: SensitivityConfig,
    out_dir: Path | str,
    *,
    blocks: Sequence[str] | None = None,
    model_name: str = "model",
    inputs: dict[str, Any] | None = None,
    resume: SensitivityReport | None = None,
    profile_groups: Sequence[int | str] = DEFAULT_PROFILE_GROUPS,
    range_method: str = DEFAULT_RANGE_METHOD,
    progress: bool = True,
    block_map: BlockMap | None = None,
) -> tuple[SensitivityReport, QuantProfile | None]:
    """The Q-BERT sensitivity report of ``model`` on ``task``, written to ``out_dir`` after every draw (with the
    state to resume from beside it, :data:`SENSITIVITY_STATE_FILE`, removed once the report is complete) and,
    once complete, the allocator's cost table (``profile.json``) for the report's blocks, its errors measured
    with ``range_method``.

    A ``resume`` report is continued only if it was computed from the same inputs (model weights, data and
    settings); otherwise the error says which differs.

    Under torch.distributed every rank calls this with the same arguments and gets the report; rank 0 writes it
    and measures the cost table (the other ranks get ``None`` for it). ``block_map`` is the model's, when the
    caller has built it (else built here, once for the report and its cost table).
    """
    from .report import write_sensitivity
    from .sensitivity import estimate_sensitivity

    block_map = BlockMap(model) if block_map is None else block_map
    out = Path(out_dir)
    check_state_file(out)
    inputs = {**(inputs or {}), "config": config.protocol()}
    if resume is not None:
        differs = [k for k in ("model", "data") if resume.inputs.get(k) and resume.inputs.get(k) != inputs.get(k)]
        if differs or not resume.inputs:
            names = {"model": "the model weights", "data": "the task data"}
            what = " and ".join(names[k] for k in differs) or "its inputs (it records none)"
            raise QBHError(
                f"cannot resume '{out / 'sensitivity.json'}': it was computed from other inputs ({what} differ from "
                "this run's); pass --force to start over"
            )

    def save(report: SensitivityReport) -> None:
        report.inputs = inputs
        write_sensitivity(report, out)

    import torch

    state_path = out / SENSITIVITY_STATE_FILE

    def save_draw(report: SensitivityReport, state: dict | None) -> None:
        if state is None:  # the blocks are finished: their report is written, the draws so far are not needed
            state_path.unlink(missing_ok=True)
            return
        save(report)
        atomic_write(state_path, lambda tmp: torch.save({**state, "inputs": inputs}, tmp))

    state = None
    if resume is not None:  # every rank resumes from rank 0's saved draws
        state = _load_state(state_path, inputs) if distributed.is_main() else None
        state = distributed.broadcast_object(state)
    report = estimate_sensitivity(
        model,
        task,
        config,
        blocks=blocks,
        model_name=model_name,
        resume=resume,
        resume_state=state,
        on_block=save,
        on_draw=save_draw,
        progress=progress,
        block_map=block_map,
    )
    report.inputs = inputs
    if not distributed.is_main():
        return report, None
    save(report)
    if not report.complete:
        return report, None
    (out / SENSITIVITY_STATE_FILE).unlink(missing_ok=True)  # also one left by a run stopped as it finished
    profile = report_profile(
        model,
        report,
        out,
        groups=profile_groups,
        model_name=model_name,
        range_method=range_method,
        block_map=block_map,
    )
    return report, profile


def _load_state(path: Path, inputs: dict[str, Any]) -> dict | None:
    """The draws a stopped sensitivity run saved, if they were computed from ``inputs`` (else None: a run of
    other inputs, or a file that cannot be read, is not resumed from; its blocks start over)."""
    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # a torn or foreign file: resuming from it would give wrong numbers
        logger.warning("cannot read '%s' (%s); the pending blocks start over", path, exc)
        return None
    if not isinstance(state, dict) or state.get("inputs") != inputs:
        logger.warning("'%s' was saved from other inputs; the pending blocks start over", path)
        return None
    return state


def report_profile(
    model: nn.Module,
    report: SensitivityReport,
    out_dir: Path | str,
    *,
    groups: Sequence[int | str],
    model_name: str,
    model_fp: str | None = None,
    range_method: str = DEFAULT_RANGE_METHOD,
    block_map: BlockMap | None = None,
) -> QuantProfile:
    """The cost table of a report's blocks (and the embedding tables), its errors measured with ``range_method``,
    saved as ``profile.json`` beside it (``block_map``: the model's, when the caller has it)."""
    block_map = BlockMap(model) if block_map is None else block_map
    profile = measure_profile(
        model,
        profile_units(block_map, [b.name for b in report.blocks]),
        groups=groups,
        range_method=range_method,
        model_name=model_name,
        inputs={"model": model_fp or report.inputs.get("model")},
        block_map=block_map,
    )
    profile.save(Path(out_dir) / PROFILE_FILE)
    return profile


def report_path(path: Path | str) -> Path:
    """``sensitivity.json`` itself, or the folder holding it."""
    path = Path(path)
    return path / "sensitivity.json" if path.is_dir() else path


def load_profile(
    report_file: Path,
    report: SensitivityReport,
    *,
    model: str | None,
    groups: object,
    range_method: str = DEFAULT_RANGE_METHOD,
) -> QuantProfile:
    """The cost table beside a report, measured from ``model`` (and saved, replacing the old one) when it is
    missing, lacks ``groups`` or was measured with another range method than ``range_method``."""
    path = report_file.parent / PROFILE_FILE
    profile = QuantProfile.load(path) if path.is_file() else None
    units = [b.name for b in report.blocks if b.name.startswith("encoder.")]
    if profile is not None and profile.range_method == range_method and units and units[0] in profile.units:
        unit = profile.units[units[0]]
        if str(groups) in unit.groups or str(groups) in unit.unavailable:
            return profile
    if model is None:
        if profile is not None and profile.range_method != range_method:
            raise QBHError(
                f"'{path}' was measured with {profile.range_method} ranges, the plan asks for {range_method}; pass "
                f"--model (the report's model) so plan measures it with {range_method}, or --weight-range "
                f"{profile.range_method}"
            )
        have = "lacks" if profile is not None else "has no"
        raise QBHError(
            f"'{report_file.parent}' {have} the quantization profile for groups={groups}; pass --model (the "
            "report's model) so plan measures it"
        )
    from .models import load_model

    fp32, _ = load_model(model, eager=False)
    block_map = BlockMap(fp32)
    if report.model.get("num_layers") != block_map.num_layers or (
        report.inputs.get("model") and report.inputs["model"] != model_fingerprint(model)
    ):
        raise QBHError(f"--model {model} is not the report's model ({report.model.get('name')}); pass that one")
    units = profile_units(block_map, [b.name for b in report.blocks])
    check_groups(fp32, [u for u in units if u.startswith("encoder.")], groups)  # before measuring anything
    groups_all = list(dict.fromkeys([*DEFAULT_PROFILE_GROUPS, groups]))
    logger.info("measuring quantization errors of %s (groups %s, %s ranges)", model, groups_all, range_method)
    fp = model_fingerprint(model)
    return report_profile(
        fp32,
        report,
        path.parent,
        groups=groups_all,
        model_name=str(model),
        model_fp=fp,
        range_method=range_method,
        block_map=block_map,
    )


def priced_profile_path(out_dir: Path | str, config: AllocConfig) -> Path:
    """Where the priced cost table of ``config`` (its measure, rounding and GPTQ settings) lives beside a report:
    ``profile-<measure>-<rounding>.json``, with a hash of the GPTQ settings when they are not the defaults."""
    name = f"profile-{config.measure.value}-{config.rounding}"
    if config.rounding == "gptq" and config.gptq_config() != GPTQConfig():
        name += "-" + fingerprint(config.gptq_config().to_dict())[:8]
    return Path(out_dir) / f"{name}.json"


def report_draws(report: SensitivityReport, task: Task) -> list[list[Any]]:
    """The report's draws as it batched them: its recorded example indices, in batches of its ``batch_size``."""
    size = int(report.config.get("batch_size", SensitivityConfig.batch_size))
    draws = [d["indices"] for d in report.draws]
    if not draws:
        raise QBHError("the sensitivity report records no draws; regenerate it with qbert-hessian sensitivity")
    n = len(task.train)
    if max(max(d) for d in draws) >= n:
        raise QBHError(
            f"the report's draws index {max(max(d) for d in draws) + 1} training examples but the task has {n}; "
            "pass the data the report was computed on"
        )
    return [[task.batch("train", idx[i : i + size]) for i in range(0, len(idx), size)] for idx in draws]


def priced_profile(
    model: nn.Module,
    task: Task,
    report: SensitivityReport,
    config: AllocConfig,
    out_dir: Path | str,
    *,
    calibration: CalibrationConfig,
    bits: Sequence[int],
    groups: Sequence[int | str],
    model_name: str,
    model_fp: str | None = None,
    progress: bool = False,
) -> QuantProfile:
    """The cost table of a report's blocks priced by ``config.measure`` (``quadratic`` or ``measured``) for
    ``config.rounding``, on the report's own draws, saved at :func:`priced_profile_path`. GPTQ rounds each entry on
    the calibration sequences quantization will use (``calibration``'s batch size and seed), so an entry's dW is
    the one the plan's model gets for that block."""
    from .quant.rounding import calibration_sequences

    block_map = BlockMap(model)
    gptq = config.gptq_config() if config.rounding == "gptq" else None
    calib = (
        calibration_sequences(task, gptq.calib_samples, calibration.batch_size, calibration.seed)
        if gptq is not None
        else []
    )
    logger.info(
        "pricing %s entries (%s rounding, bits %s, groups %s)",
        config.measure.value,
        config.rounding,
        list(bits),
        list(groups),
    )
    profile = measure_priced_profile(
        model,
        profile_units(block_map, [b.name for b in report.blocks]),
        report_draws(report, task),
        measure=config.measure,
        rounding=config.rounding,
        gptq=gptq,
        calibration=calib,
        bits=bits,
        groups=groups,
        range_method=config.range_method,
        model_name=model_name,
        inputs={
            "model": model_fp or report.inputs.get("model"),
            "data": report.inputs.get("data"),
            "draws": fingerprint([report.config, [d["indices"] for d in report.draws]]),
            **({"calibration": calibration.to_dict()} if gptq is not None else {}),
        },
        block_map=block_map,
        progress=progress,
    )
    profile.save(priced_profile_path(out_dir, config))
    return profile


def plan_profile(
    report_file: Path,
    report: SensitivityReport,
    config: AllocConfig,
    *,
    model: str | None,
    data: Path | None = None,
    calibration: CalibrationConfig = CalibrationConfig(),
    progress: bool = False,
) -> QuantProfile:
    """The cost table a plan of ``config`` is made from: :func:`load_profile` for ``omega`` and ``trace``; for a
    priced measure the table beside the report (:func:`priced_profile_path`) when it holds ``config``'s grouping
    and widths from these draws, else priced now from ``model`` on the report's task (``data``: its folder)."""
    if not config.measure.priced:
        return load_profile(report_file, report, model=model, groups=config.groups, range_method=config.range_method)
    path = priced_profile_path(report_file.parent, config)
    draws_fp = fingerprint([report.config, [d["indices"] for d in report.draws]])
    calib = calibration.to_dict() if config.rounding == "gptq" else None
    if path.is_file():
        have = QuantProfile.load(path)
        units = [b.name for b in report.blocks if b.name.startswith("encoder.")]
        unit = have.units.get(units[0]) if units else None
        cost = unit.groups.get(str(config.groups)) if unit is not None else None
        if (
            cost is not None
            and all(str(b) in cost.error for b in config.bits)
            and have.range_method == config.range_method
            and have.inputs.get("draws") == draws_fp
            and have.inputs.get("calibration") == calib
        ):
            return have
    what = f"{config.measure.value} losses with {config.rounding} rounding"
    if model is None:
        raise QBHError(
            f"'{report_file.parent}' has no cost table of {what} for bits {','.join(map(str, config.bits))} and "
            f"groups={config.groups}; pass --model (the report's model, and --data its task's folder) so plan "
            "prices it"
        )
    from .tasks import load_raw_task

    raw = load_raw_task(report.task, data_dir=data)
    if report.inputs.get("data") and report.inputs["data"] != data_fingerprint(raw):
        raise QBHError(
            f"the data of task {report.task} ({data or 'default'}) is not the data the report was computed on; "
            "pass that folder with --data"
        )
    if report.inputs.get("model") and report.inputs["model"] != model_fingerprint(model):
        raise QBHError(f"--model {model} is not the report's model ({report.model.get('name')}); pass that one")
    fp32, task = load_for_task(model, raw, max_length=int(report.config.get("max_length", 128)), eager=True)
    check_groups(fp32, [b.name for b in report.blocks if b.name.startswith("encoder.")], config.groups)
    return priced_profile(
        fp32,
        task,
        report,
        config,
        report_file.parent,
        calibration=calibration,
        bits=config.bits,
        groups=[config.groups],
        model_name=str(model),
        model_fp=model_fingerprint(model),
        progress=progress,
    )


# --------------------------------------------------------------------------------------------------- planning


def make_plan(
    report: SensitivityReport,
    profile: QuantProfile,
    plan: ResolvedPlan | PlanSpec,
    defaults: AllocConfig | None = None,
    *,
    source: dict[str, Any] | None = None,
) -> BitPlan:
    """One plan over the report: a plan resolved with its run's config (``run_config.resolve_plan``), or a spec
    as the ``plan`` command gives it, resolved here against ``defaults`` (a uniform width or a budget, its
    allocator settings, and how its widths are assigned)."""
    if isinstance(plan, PlanSpec):
        plan = resolve_plan(plan, defaults or AllocConfig())
    if plan.budget is None:
        assert plan.uniform is not None
        return uniform_plan(report, profile, plan.uniform, plan.alloc, source=source)
    spec = plan.spec
    return allocate_bits(
        report, profile, plan.budget, plan.alloc, source=source, assign=spec.assign, assign_seed=spec.assign_seed
    )


def write_plan(plan: BitPlan, path: Path | str) -> Path:
    """``plan.json`` and ``plan.md`` beside it."""
    from .report import plan_markdown

    path = Path(path)
    plan.save(path)
    write_text(path.with_suffix(".md"), plan_markdown(plan))
    return path


def write_frontier(
    report: SensitivityReport, profile: QuantProfile, config: AllocConfig, out_dir: Path | str, plan: BitPlan | None
) -> Path:
    """``frontier.json`` and ``frontier.png`` (MILP plans over budgets, uniform plans, the rank rule)."""
    from .report import plot_frontier

    out = Path(out_dir)
    front = frontier(report, profile, dataclasses.replace(config, method="milp"))
    front.save(out / "frontier.json")
    return plot_frontier(front.to_dict(), out / "frontier.png", plan)


# ------------------------------------------------------------------------------------------ quantize / export


def with_range_method(plan: BitPlan, range_method: str | None) -> BitPlan:
    """``plan`` with its weights' ranges chosen by ``range_method`` instead (None or the plan's own: ``plan``).

    The copy says so in its notes: the predicted sizes still hold (a range method changes no stored tensor),
    the predicted errors and objective were measured with the plan's own method.
    """
    if range_method is None or range_method == plan.range_method:
        return plan
    check_range_method(range_method, "weight range method")
    note = (
        f"quantized with {range_method} ranges; the plan was made with {plan.range_method} (its predicted sizes "
        f"hold, its errors and objective are those of {plan.range_method})"
    )
    return dataclasses.replace(plan, range_method=range_method, notes=[*plan.notes, note])


def with_rounding(
    plan: BitPlan, rounding: str | None, *, calib_samples: int | None = None, damp: float | None = None
) -> BitPlan:
    """``plan`` with its weights rounded by ``rounding`` (None: the plan's own) and, for ``gptq``, these calibration
    settings (None: the plan's, else the defaults); ``plan`` itself when nothing changes.

    The copy says so in its notes: the predicted sizes hold (a rounding changes no stored tensor's size), the
    predicted errors and objective are those the plan was made with.
    """
    rounding = plan.rounding if rounding is None else check_rounding(rounding, "rounding")
    gptq = None
    if rounding == "gptq":
        settings = {**(plan.gptq or {})}
        settings.update({k: v for k, v in (("calib_samples", calib_samples), ("damp", damp)) if v is not None})
        try:
            gptq = GPTQConfig.from_dict(settings).to_dict()
        except QBHError as exc:
            raise QBHError(str(exc).replace("GPTQConfig.", "AllocConfig.")) from None
    elif calib_samples is not None or damp is not None:
        raise QBHError("--calib-samples and --damp set second-order rounding; add --rounding gptq (or drop them)")
    if (rounding, gptq) == (plan.rounding, plan.gptq):
        return plan
    what = "nearest rounding" if gptq is None else f"gptq ({gptq['calib_samples']} sequences, damp {gptq['damp']})"
    note = (
        f"rounded by {what}; the plan was made with {plan.rounding} rounding (its predicted sizes hold, its errors "
        f"and objective are those it was made with)"
    )
    return dataclasses.replace(plan, rounding=rounding, gptq=gptq, notes=[*plan.notes, note])


def with_act_range(plan: BitPlan, act_range: str | None) -> BitPlan:
    """``plan`` with its activation ranges set by ``act_range`` instead (None or the plan's own: ``plan``).

    The copy says so in its notes; between a static range and ``dynamic`` the packed size moves by the stored
    ranges (4 bytes and a header entry per quantized linear), which the plan's prediction counted or not.
    """
    if act_range is None or act_range == plan.act_range:
        return plan
    check_act_range(act_range, "activation range")
    note = f"activation ranges set by {act_range}; the plan was made with {plan.act_range}"
    if "dynamic" in (act_range, plan.act_range) and plan.act_bits is not None:
        stored = "without" if plan.act_range == "dynamic" else "with"
        note += f" (its predicted size is the file's {stored} a stored range per quantized linear)"
    return dataclasses.replace(plan, act_range=act_range, notes=[*plan.notes, note])


def quantize_direct(
    model: nn.Module, plan: BitPlan, task: Task, calibration: CalibrationConfig, *, progress: bool = False
) -> nn.Module:
    """The plan applied to a copy of ``model`` (weights rounded as the plan says: nearest, or GPTQ on seeded
    training sequences), activation ranges from seeded training batches (post-training)."""
    from .quant.apply import quantize_calibrated

    return quantize_calibrated(
        model,
        plan,
        task,
        num_batches=calibration.calibration_batches,
        batch_size=calibration.batch_size,
        seed=calibration.seed,
        progress=progress,
    )


def export(
    qmodel: nn.Module, plan: BitPlan, out_dir: Path | str, *, fp32: nn.Module, tokenizer: Any = None
) -> SizeReport:
    """The packed checkpoint of ``qmodel`` in ``out_dir`` and its ``size.json`` (bytes on disk vs FP32, vs plan)."""
    from .export import file_sizes, fp32_safetensors_bytes, save_packed

    out = Path(out_dir)
    save_packed(qmodel, out, plan=plan, tokenizer=tokenizer)
    sizes = file_sizes(out)
    size = SizeReport(
        packed_bytes=sizes["weights_bytes"],
        folder_bytes=sizes["folder_bytes"],
        fp32_safetensors_bytes=fp32_safetensors_bytes(fp32),
        predicted_bytes=plan.predicted_packed_bytes,
    )
    size.save(out / "size.json")
    return size


def load_for_task(
    name_or_path: str | Path, raw: RawTask, *, max_length: int, eager: bool = True, device: str = "cpu"
) -> tuple[nn.Module, Task]:
    """An FP32 checkpoint or a packed one, and the task tokenized with its tokenizer, its labels numbered as the
    model's head numbers them (matched by name: :func:`~qbert_hessian.tasks.match_labels`)."""
    from .export import is_packed, load_packed
    from .models import load_config, load_model, load_tokenizer
    from .tasks import tokenize_task

    check_not_trained_on_dev(name_or_path, raw)
    config = load_config(str(name_or_path))
    raw = head_labels(raw, config, str(name_or_path))
    if is_packed(name_or_path):
        check_head(config, raw, str(name_or_path))  # before the weights are read into a head of the wrong size
        model = load_packed(name_or_path, eager=eager, device=device)
        tokenizer = load_tokenizer(str(name_or_path))
    else:
        model, tokenizer = load_model(
            str(name_or_path), task_family=raw.family, num_labels=len(raw.label_names), eager=eager, device=device
        )
    return model, tokenize_task(raw, tokenizer, max_length=max_length)


def check_not_trained_on_dev(name_or_path: str | Path, raw: RawTask) -> None:
    """Refuse to score a checkpoint on a dev split it was fine-tuned on: ``mnli-local``'s training split is
    ``mnli-local-mm``'s dev split and the other way round (the task recorded in the checkpoint's ``metrics.json``,
    where ``finetune`` writes it)."""
    from .tasks.classification import TRAINED_ON_DEV_OF

    other = TRAINED_ON_DEV_OF.get(raw.name)
    path = Path(name_or_path) / "metrics.json"
    if other is None or not path.is_file():
        return
    try:
        trained = json.loads(path.read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError):
        return  # not a finetune record; nothing says which task the model saw
    if trained == other:
        raise QBHError(
            f"model '{name_or_path}' was fine-tuned on task '{other}', whose training split is the dev split of "
            f"'{raw.name}'; score it with --task {other}, or fine-tune a model on '{raw.name}'"
        )


def head_labels(raw: RawTask, config: Any, name: str) -> RawTask:
    """``raw`` numbered as a trained head of its family numbers its labels (by name); a model without such a head
    (a base encoder, another family's head) names nothing, and ``raw`` is returned as it is."""
    from .models import head_family
    from .tasks import match_labels

    if head_family(getattr(config, "architectures", None)) != raw.family:
        return raw
    return match_labels(raw, getattr(config, "id2label", None), name)


def check_head(model: Any, raw: RawTask, name: str) -> None:
    """Refuse a model (or its HF config) whose task head does not fit the task: another family (a sequence
    classifier for a NER task), or another number of labels."""
    from .models import head_family

    config = getattr(model, "config", model)
    family = head_family(getattr(config, "architectures", None))
    if family is not None and family != raw.family:
        raise QBHError(
            f"model '{name}' has a {family} head but task '{raw.name}' is a {raw.family} task; "
            "pass the model fine-tuned on this task"
        )
    have = getattr(config, "num_labels", None)
    if have is not None and have != len(raw.label_names):
        raise QBHError(
            f"model '{name}' has a {have}-label head but task '{raw.name}' has {len(raw.label_names)} labels; "
            "pass the model fine-tuned on this task"
        )


# ------------------------------------------------------------------------------------------- density / landscape


def density(
    model: nn.Module, task: Task, blocks: Sequence[str], config: DensityConfig, *, model_name: str = "model"
) -> DensityReport:
    """The Hessian eigenvalue density of each block by stochastic Lanczos quadrature (one kernel width for all)."""
    import torch

    from .hessian.density import slq_density, smooth_alike
    from .hessian.hvp import BlockHessian, autocast_products, curvature_mode, grads_enabled
    from .landscape import block_parameters
    from .models import curvature_kernels

    check_blocks(model, blocks)
    n = min(config.batch_size, len(task.train))
    # Under torch.distributed each rank takes every world_size-th example of the batch (data-parallel products).
    data_parallel = 1 < distributed.world_size() <= n
    batch = task.batch("train", distributed.shard(range(n)) if data_parallel else list(range(n)))
    found = []
    generator = torch.Generator().manual_seed(config.seed)
    with curvature_kernels(model), curvature_mode(model):
        for b in blocks:
            params = block_parameters(model, b)
            with grads_enabled(params):
                hvp = BlockHessian(model, params, [batch], data_parallel=data_parallel)
                products = autocast_products(hvp) if config.precision == Precision.BF16 else hvp
                res = slq_density(products, params, steps=config.steps, num_probes=config.probes, generator=generator)
                hvp.free()
            found.append((b, sum(p.numel() for p in params), res))
            lo, hi = res.extremes
            logger.info("%s: Ritz values from %.4g to %.4g; mean eigenvalue %.4g", b, lo, hi, res.moment(1))
    smooth_alike([r for _, _, r in found])  # one kernel width, so the curves compare
    precision = {} if config.precision == Precision.FP32 else {"precision": config.precision.value}
    return DensityReport(
        model=model_name,
        task=task.name,
        batch_size=n,
        probes=config.probes,
        # a bf16 density says so (an fp32 one is written as before the setting existed)
        densities=[{"block": b, "num_params": k, **r.to_dict(), **precision} for b, k, r in found],
    )


def check_blocks(model: nn.Module, blocks: Sequence[str]) -> None:
    """Every block exists in ``model`` (``model`` names all weights); a one-line error otherwise."""
    from .landscape import WHOLE_MODEL

    if not blocks:
        raise QBHError("no block given; name one or more, e.g. --block encoder.0,encoder.5 (or 'model')")
    block_map = BlockMap(model)
    for b in blocks:
        if b != WHOLE_MODEL:
            block_map.module_path(b)


def landscapes(
    model: nn.Module,
    task: Task,
    blocks: Sequence[str],
    config: Any,
    out_dir: Path | str,
    *,
    model_name: str = "model",
    resume: bool = False,
    progress: bool = True,
    on_done: Callable[[Any, Path], None] | None = None,
) -> list[Any]:
    """The loss surface of each block (``<out>/<block>/landscape.{json,png}``), rows written as they finish.

    Under torch.distributed every rank computes a share of each row; rank 0 reads the partial files it resumes
    from, writes the files and calls ``on_done``.
    """
    from .landscape import Landscape, loss_landscape
    from .report import plot_landscapes

    check_blocks(model, blocks)
    out = Path(out_dir)
    main = distributed.is_main()
    done = []
    for b in blocks:
        path = out / b / "landscape.json"
        previous = Landscape.load(path) if main and path.exists() and resume else None
        previous = distributed.broadcast_object(previous)
        if previous is not None and previous.complete and previous.config == config.to_dict():
            done.append(previous)
            continue
        ls = loss_landscape(
            model,
            task,
            config,
            block=b,
            model_name=model_name,
            resume=previous,
            on_row=lambda partial, path=path: partial.save(path),
            progress=progress,
        )
        done.append(ls)
        if main:
            ls.save(path)
            plot_landscapes([ls.to_dict()], path.with_suffix(".png"))
            if on_done is not None:
                on_done(ls, path)
    if len(done) > 1 and main:
        plot_landscapes([ls.to_dict() for ls in done], out / "panels.png")
    return done


__all__ = [
    "plan_profile",
    "priced_profile",
    "priced_profile_path",
    "report_draws",
    "model_fingerprint",
    "data_fingerprint",
    "file_fingerprint",
    "fingerprint",
    "check_state_file",
    "sensitivity",
    "report_path",
    "load_profile",
    "make_plan",
    "write_plan",
    "write_frontier",
    "with_range_method",
    "with_rounding",
    "with_act_range",
    "quantize_direct",
    "export",
    "load_for_task",
    "check_head",
    "head_labels",
    "density",
    "landscapes",
    "WEIGHTS_FILE",
]
