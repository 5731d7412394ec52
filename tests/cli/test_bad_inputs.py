"""Every bad input a careless user tried, as a table: the command, what is wrong, the expected exit code and a
fragment of the one-line message, and that nothing was written or deleted (the whole workspace is compared
file by file, sizes, times and modes, before and after).

Silent wrong answers are tested for refusal, not for a warning. The cases are grouped as the issue that
listed them is (#15): silent wrong answers, tracebacks, output paths, corrupt inputs, small gaps, friction,
and the ones that already worked before it (kept so they stay working).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from qbert_hessian.cli import main
from tests.helpers import make_tiny_checkpoint, write_mnli_dir, write_ner_dir, write_squad_dir, write_tsv

DATA = ["--task", "sst2", "--max-length", "16"]
SENS = ["--draws", "2", "--batch-size", "8", "--max-iters", "8", "--trace-samples", "2", "--quiet"]

RUN_TOML = """
[model]
name = "{model}"
task = "sst2"
data = "{data}"
max_length = 16

[sensitivity]
draws = 2
batch_size = 8
max_iters = 8
trace_samples = 2

[allocate]
calib_samples = 32  # rounding by gptq, the default, on what the tiny data has (96 sentences)

[qat]
epochs = 1
batch_size = 16

[run]
calibration_batches = 2
batch_size = 8

[[plans]]
name = "uniform-4"
uniform = 4
qat = false
"""


@dataclasses.dataclass
class World:
    """Inputs shared by the cases (built once; every case must leave them untouched)."""

    root: Path
    ckpt: Path
    ckpt_other: Path  # same shape, other weights
    ckpt5: Path  # a 5-label classifier
    no_tokenizer: Path
    data: Path
    report: Path
    partial_report: Path
    plan: Path
    packed: Path

    def model(self, model: Path | None = None) -> list[str]:
        return ["--model", str(model or self.ckpt), *DATA, "--data", str(self.data)]


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tiny_data, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    ckpt = root / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    data = root / "data"
    shutil.copytree(tiny_data, data)
    no_tok = root / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(ckpt / name, no_tok / name)
    w = World(
        root=root,
        ckpt=ckpt,
        ckpt_other=make_tiny_checkpoint(root / "ckpt_other", seed=7),
        ckpt5=make_tiny_checkpoint(root / "ckpt5", num_labels=5),
        no_tokenizer=no_tok,
        data=data,
        report=root / "report",
        partial_report=root / "partial",
        plan=root / "plan" / "plan.json",
        packed=root / "packed",
    )
    assert main(["sensitivity", *w.model(), *SENS, "--out", str(w.report)]) == 0
    assert main(["sensitivity", *w.model(), *SENS, "--blocks", "encoder.0", "--out", str(w.partial_report)]) == 0
    plan = ["plan", "--report", str(w.report), "--avg-bits", "3", "--bits", "2,4", "--groups", "channel"]
    plan += ["--calib-samples", "32"]  # rounding by gptq, the default, on what the tiny data has (96 sentences)
    assert main([*plan, "--out", str(w.plan), "--quiet"]) == 0
    assert main(["quantize", *w.model(), "--plan", str(w.plan), "--out", str(w.packed), "--quiet"]) == 0
    return w


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[World, Path], list[str]]  # (world, a fresh folder for this case's own inputs) -> argv
    message: str
    code: int = 2
    usage: bool = False  # argparse's own error: usage lines before the message
    skip: str | None = None


# --------------------------------------------------------------------------------------------- case builders


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tsv(tmp: Path, train_lines: list[str] | None = None, dev_lines: list[str] | None = None) -> Path:
    d = tmp / "data"
    write_tsv(d / "train.tsv", 96, seed=0)
    write_tsv(d / "dev.tsv", 24, seed=1)
    if train_lines is not None:
        (d / "train.tsv").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    if dev_lines is not None:
        (d / "dev.tsv").write_text("\n".join(dev_lines) + "\n", encoding="utf-8")
    return d


def _with_extra_tab(tmp: Path) -> Path:
    d = _tsv(tmp)
    lines = (d / "train.tsv").read_text(encoding="utf-8").splitlines()
    lines.insert(5, "a fun movie\tbut long\t1")  # a tab inside the sentence
    (d / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def _one_label(tmp: Path) -> Path:
    return _tsv(tmp, ["sentence\tlabel", *[f"good movie {i}\t1" for i in range(40)]], ["sentence\tlabel", "fun\t1"])


def _sens(w: World, tmp: Path, data: Path, *extra: str) -> list[str]:
    return ["sensitivity", "--model", str(w.ckpt), *DATA, "--data", str(data), *SENS, "--out", str(tmp / "o"), *extra]


def _run(w: World, tmp: Path, edit: Callable[[str], str] = lambda t: t, *extra: str) -> list[str]:
    cfg = tmp / "run.toml"
    cfg.write_text(edit(RUN_TOML.format(model=w.ckpt, data=w.data)), encoding="utf-8")
    return ["run", str(cfg), "--out", str(tmp / "out"), "--quiet", *extra]


def _set(section: str, line: str) -> Callable[[str], str]:
    """Add ``line`` to ``[section]`` (creating the section when the config lacks it)."""

    def edit(text: str) -> str:
        head = f"[{section}]\n"
        return text.replace(head, head + line + "\n", 1) if head in text else f"{text}\n{head}{line}\n"

    return edit


def _draws(value: str) -> Callable[[str], str]:
    return lambda text: text.replace("draws = 2", f"draws = {value}", 1)


def _report(w: World, tmp: Path, edit: Callable[[dict], None]) -> Path:
    d = _copy(w.report, tmp / "report")
    data = json.loads((d / "sensitivity.json").read_text())
    edit(data)
    (d / "sensitivity.json").write_text(json.dumps(data, allow_nan=True))
    return d


def _omega(value) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["blocks"][1]["omega"] = value

    return edit


def _rename_block(data: dict) -> None:
    data["blocks"][1]["name"] = "encoder.7"


def _plan_cmd(w: World, tmp: Path, report: Path | None = None, *extra: str) -> list[str]:
    out = str(tmp / "p" / "plan.json")
    return ["plan", "--report", str(report or w.report), "--groups", "channel", "--out", out, "--quiet", *extra]


def _edited_plan(w: World, tmp: Path, edit: Callable[[dict], None]) -> Path:
    data = json.loads(w.plan.read_text())
    edit(data)
    path = tmp / "plan.json"
    path.write_text(json.dumps(data))
    return path


def _quantize(w: World, tmp: Path, plan: Path, out: Path | None = None, *extra: str, model: Path | None = None):
    return ["quantize", *w.model(model), "--plan", str(plan), "--out", str(out or tmp / "q"), "--quiet", *extra]


def _partial(w: World, tmp: Path) -> Path:
    """A copy of the report as an interrupted run leaves it: one block done, the rest pending."""
    out = _copy(w.report, tmp / "o")
    path = out / "sensitivity.json"
    full = json.loads(path.read_text())
    path.write_text(
        json.dumps(dict(full, blocks=full["blocks"][:1], pending=["encoder.0", "encoder.1"], complete=False))
    )
    return out


def _truncated(src: Path, dst: Path, name: str) -> Path:
    d = _copy(src, dst)
    raw = (d / name).read_bytes()
    (d / name).write_bytes(raw[: len(raw) // 2])
    return d


def _without(src: Path, dst: Path, name: str) -> Path:
    d = _copy(src, dst)
    (d / name).unlink()
    return d


def _file(tmp: Path, name: str = "a_file") -> Path:
    path = tmp / name
    path.write_text("not a folder\n")
    return path


def _foreign_dir(tmp: Path) -> Path:
    d = tmp / "results"
    d.mkdir()
    (d / "notes.txt").write_text("the user's own file\n")
    return d


def _readonly(tmp: Path) -> Path:
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


def _non_utf8(tmp: Path) -> Path:
    d = _tsv(tmp)
    (d / "train.tsv").write_bytes(b"sentence\tlabel\n" + "caf\u00e9 movie\t1\n".encode("latin-1") * 40)
    return d


ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
AS_ROOT = "root ignores folder permissions" if ROOT else None

# ------------------------------------------------------------------------------------------------- the table

SILENT = [
    # 1. a model folder without tokenizer files
    Case("no-tokenizer-evaluate", lambda w, t: ["evaluate", *w.model(w.no_tokenizer), "--quiet"], "no tokenizer"),
    Case(
        "no-tokenizer-sensitivity",
        lambda w, t: ["sensitivity", *w.model(w.no_tokenizer), *SENS, "--out", str(t / "o")],
        "no tokenizer",
    ),
    Case("no-tokenizer-quantize", lambda w, t: _quantize(w, t, w.plan, model=w.no_tokenizer), "no tokenizer"),
    # 2. a label-count mismatch would replace the trained head with a random one
    Case("head-mismatch-evaluate", lambda w, t: ["evaluate", *w.model(w.ckpt5), "--quiet"], "trained 5-label head"),
    Case(
        "head-mismatch-sensitivity",
        lambda w, t: ["sensitivity", *w.model(w.ckpt5), *SENS, "--out", str(t / "o")],
        "trained 5-label head",
    ),
    Case(
        "head-mismatch-landscape",
        lambda w, t: [
            "landscape",
            *w.model(w.ckpt5),
            "--block",
            "encoder.0",
            "--grid",
            "3",
            "--out",
            str(t / "o"),
            "--quiet",
        ],
        "trained 5-label head",
    ),
    Case("extra-tab-adds-a-class", lambda w, t: _sens(w, t, _with_extra_tab(t)), "has 3 fields"),
    Case("single-valued-labels", lambda w, t: _sens(w, t, _one_label(t)), "1 label value(s)"),
    # 3. --force replaces only what the command writes
    Case(
        "quantize-force-foreign-folder",
        lambda w, t: _quantize(w, t, w.plan, _foreign_dir(t), "--force"),
        "is not a packed checkpoint",
    ),
    # 4. resume checks weights and data
    Case(
        "resume-other-weights",
        lambda w, t: ["sensitivity", *w.model(w.ckpt_other), *SENS, "--out", str(_partial(w, t)), "--resume"],
        "the model weights differ",
    ),
    Case(
        "resume-other-data",
        lambda w, t: [
            "sensitivity",
            "--model",
            str(w.ckpt),
            *DATA,
            "--data",
            str(_other_data(t)),
            *SENS,
            "--out",
            str(_partial(w, t)),
            "--resume",
        ],
        "the task data differ",
    ),
    # 5. booleans and numbers are typed
    Case("toml-qat-no", lambda w, t: _run(w, t, _set("run", 'qat = "no"')), "[run] qat = 'no' is not true/false"),
    Case("set-qat-maybe", lambda w, t: _run(w, t, lambda s: s, "--set", "run.qat=maybe"), "'maybe' is not true/false"),
    Case("toml-frontier-yes", lambda w, t: _run(w, t, _set("run", 'frontier = "yes"')), "frontier = 'yes'"),
    Case(
        "toml-distill-yes",
        lambda w, t: _run(w, t, _set("qat", 'distill = "yes"')),
        "[qat] distill 'yes' is not valid",
    ),
    Case("toml-draws-true", lambda w, t: _run(w, t, _draws("true")), "draws = True"),
    # 6. plans from incomplete or edited reports
    Case(
        "plan-partial-report",
        lambda w, t: _plan_cmd(w, t, w.partial_report, "--avg-bits", "3"),
        "does not score encoder.1",
    ),
    Case(
        "plan-unknown-block",
        lambda w, t: _plan_cmd(w, t, _report(w, t, _rename_block), "--avg-bits", "3"),
        "a block of another model: block 'encoder.7' does not exist",
    ),
    Case("plan-negative-omega", lambda w, t: _plan_cmd(w, t, _report(w, t, _omega(-1.0)), "--avg-bits", "3"), "Omega"),
    # 7. landscape and tolerance edge values
    Case(
        "landscape-empty-block",
        lambda w, t: ["landscape", *w.model(), "--block", ",", "--out", str(t / "o")],
        "--block",
    ),
    Case(
        "landscape-grid-1",
        lambda w, t: ["landscape", *w.model(), "--block", "encoder.0", "--grid", "1", "--out", str(t / "o")],
        "grid",
    ),
    Case(
        "sensitivity-tol-nan",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--tol", "nan", "--out", str(t / "o")],
        "tol",
    ),
    Case(
        "hutchpp-shared",
        lambda w, t: [
            "sensitivity",
            *w.model(),
            *SENS,
            "--trace-method",
            "hutchpp",
            "--trace",
            "shared",
            "--out",
            str(t / "o"),
        ],
        "use --trace block",
    ),
    Case(
        "hutchpp-two-products",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--trace-method", "hutchpp", "--out", str(t / "o")],
        "--trace-samples = 2 is too few for Hutch++",
    ),
    Case(
        "sensitivity-draw-fraction-above-one",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--draw-fraction", "1.5", "--out", str(t / "o")],
        "--draw-fraction must lie in (0, 1], e.g. 0.1; got 1.5",
    ),
    Case(
        "sensitivity-draw-fraction-and-batches",
        lambda w, t: [
            "sensitivity",
            *w.model(),
            *SENS,
            *("--draw-fraction", "0.1", "--batches-per-draw", "2", "--out", str(t / "o")),
        ],
        "give --draw-fraction or --batches-per-draw, not both",
    ),
    Case(
        "sensitivity-parallel-unknown",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--parallel", "ranks", "--out", str(t / "o")],
        "argument --parallel: invalid choice: 'ranks'",
        usage=True,
    ),
    Case(
        "sensitivity-precision-unknown",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--precision", "fp16", "--out", str(t / "o")],
        "argument --precision: invalid choice: 'fp16'",
        usage=True,
    ),
    Case(
        "run-precision-unknown",
        lambda w, t: _run(w, t, lambda s: s, "--precision", "fp16"),
        "argument --precision: invalid choice: 'fp16'",
        usage=True,
    ),
    Case(
        "density-precision-mixed",
        lambda w, t: ["density", *w.model(), "--block", "encoder.0", "--precision", "mixed", "--out", str(t / "o")],
        "--precision 'mixed' certifies eigenvalues, and a density has none to certify",
    ),
    Case(
        "toml-precision-unknown",
        lambda w, t: _run(w, t, _set("sensitivity", 'precision = "fp16"')),
        "unknown precision 'fp16'; choose one of fp32, bf16, mixed",
    ),
]


def _other_data(tmp: Path) -> Path:
    d = tmp / "other"
    write_tsv(d / "train.tsv", 96, seed=5)
    write_tsv(d / "dev.tsv", 24, seed=6)
    return d


TYPES = [
    Case("toml-draws-two", lambda w, t: _run(w, t, _draws('"two"')), "draws = 'two'"),
    Case("toml-draws-2.5", lambda w, t: _run(w, t, _draws("2.5")), "draws = 2.5"),
    Case(
        "toml-max-length-str",
        lambda w, t: _run(w, t, lambda s: s.replace("max_length = 16", 'max_length = "64"')),
        "max_length = '64'",
    ),
    Case("toml-tol-str", lambda w, t: _run(w, t, _set("sensitivity", 'tol = "1e-3"')), "tol = '1e-3'"),
    Case(
        "toml-epochs-one",
        lambda w, t: _run(w, t, lambda s: s.replace("epochs = 1", 'epochs = "one"')),
        "epochs = 'one'",
    ),
    Case("toml-bits-str", lambda w, t: _run(w, t, _set("allocate", 'bits = "2,3,4,8"')), "bits = '2,3,4,8'"),
    Case(
        "toml-calibration-str",
        lambda w, t: _run(w, t, lambda s: s.replace("calibration_batches = 2", 'calibration_batches = "2"')),
        "calibration_batches = '2'",
    ),
    Case("toml-out-int", lambda w, t: _run(w, t, lambda s: "out = 5\n" + s)[:2] + ["--quiet"], "out"),
    Case("set-draws-abc", lambda w, t: _run(w, t, lambda s: s, "--set", "sensitivity.draws=abc"), "draws = 'abc'"),
    Case("set-draws-list", lambda w, t: _run(w, t, lambda s: s, "--set", "sensitivity.draws=[1,2]"), "draws = [1, 2]"),
    Case("set-equals-only", lambda w, t: _run(w, t, lambda s: s, "--set", "="), "is not section.key=value"),
    Case(
        "set-empty-value",
        lambda w, t: _run(w, t, lambda s: s, "--set", "sensitivity.draws="),
        "is not section.key=value",
    ),
    Case("set-unknown-key", lambda w, t: _run(w, t, lambda s: s, "--set", "sensitivity.drawz=2"), "drawz"),
    Case("set-unknown-section", lambda w, t: _run(w, t, lambda s: s, "--set", "plans.name=x"), "unknown section"),
]

OUT_PATHS = [
    Case(
        "plan-out-under-file",
        lambda w, t: ["plan", "--report", str(w.report), "--avg-bits", "3", "--out", str(_file(t) / "plan.json")],
        "lies under the file",
    ),
    Case(
        "sensitivity-out-under-file",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--out", str(_file(t) / "o")],
        "lies under the file",
    ),
    Case(
        "finetune-out-under-file",
        lambda w, t: ["finetune", *w.model(), "--epochs", "1", "--quiet", "--out", str(_file(t) / "ft")],
        "lies under the file",
    ),
    Case(
        "sensitivity-out-read-only",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--out", str(_readonly(t) / "o")],
        "is not writable",
        skip=AS_ROOT,
    ),
    Case(
        "evaluate-out-is-a-folder",
        lambda w, t: ["evaluate", *w.model(), "--quiet", "--out", str(_foreign_dir(t))],
        "is a folder",
    ),
    Case(
        "quantize-out-is-a-file-force",
        lambda w, t: _quantize(w, t, w.plan, _file(t), "--force"),
        "is not a packed checkpoint",
    ),
    Case(
        "density-out-under-file",
        lambda w, t: ["density", *w.model(), "--block", "encoder.0", "--out", str(_file(t) / "d")],
        "lies under the file",
    ),
]

CORRUPT = [
    Case(
        "model-without-weights",
        lambda w, t: ["evaluate", *w.model(_without(w.ckpt, t / "m", "model.safetensors")), "--quiet"],
        "model.safetensors",
    ),
    Case(
        "model-truncated-weights",
        lambda w, t: ["evaluate", *w.model(_truncated(w.ckpt, t / "m", "model.safetensors")), "--quiet"],
        "could not load the weights",
    ),
    Case(
        "packed-without-weights",
        lambda w, t: ["evaluate", *w.model(_without(w.packed, t / "p", "model.safetensors")), "--quiet"],
        "model.safetensors",
    ),
    Case(
        "packed-truncated-weights",
        lambda w, t: ["evaluate", *w.model(_truncated(w.packed, t / "p", "model.safetensors")), "--quiet"],
        "cannot be read",
    ),
    Case("data-not-utf8", lambda w, t: _sens(w, t, _non_utf8(t)), "UTF-8"),
    Case("toml-not-utf8", lambda w, t: _toml_bytes(t, b"[model]\nname = '\xe9'\n"), "UTF-8"),
    Case("omega-null", lambda w, t: _plan_cmd(w, t, _report(w, t, _omega(None)), "--avg-bits", "3"), "Omega"),
    Case("omega-string", lambda w, t: _plan_cmd(w, t, _report(w, t, _omega("big")), "--avg-bits", "3"), "Omega"),
    Case("omega-nan", lambda w, t: _plan_cmd(w, t, _report(w, t, _omega(math.nan)), "--avg-bits", "3"), "Omega"),
    Case("omega-inf", lambda w, t: _plan_cmd(w, t, _report(w, t, _omega(math.inf)), "--avg-bits", "3"), "Omega"),
    Case(
        "report-not-json",
        lambda w, t: _plan_cmd(w, t, _garbage(t / "r", "sensitivity.json"), "--avg-bits", "3"),
        "not valid JSON",
    ),
    Case("plan-not-json", lambda w, t: _quantize(w, t, _garbage(t, "plan.json") / "plan.json"), "not valid JSON"),
    Case("plan-of-another-model", lambda w, t: _quantize(w, t, _edited_plan(w, t, _add_block)), "encoder.2"),
]


def _toml_bytes(tmp: Path, raw: bytes) -> list[str]:
    cfg = tmp / "run.toml"
    cfg.write_bytes(raw)
    return ["run", str(cfg), "--out", str(tmp / "out")]


def _garbage(d: Path, name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("{ not json")
    return d


def _add_block(plan: dict) -> None:
    plan["blocks"]["encoder.2"] = dict(plan["blocks"]["encoder.1"])


def _bits_as(value) -> Callable[[dict], None]:
    def edit(plan: dict) -> None:
        plan["blocks"]["encoder.0"]["bits"] = value

    return edit


def _act_bits(value) -> Callable[[dict], None]:
    def edit(plan: dict) -> None:
        plan["act_bits"] = value

    return edit


GAPS = [
    Case(
        "seed-negative",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--seed", "-1", "--out", str(t / "o")],
        "--seed must be an integer >= 0, got -1",
    ),
    Case(
        "density-batch-size-0",
        lambda w, t: ["density", *w.model(), "--block", "encoder.0", "--batch-size", "0", "--out", str(t / "o")],
        "--batch-size must be a positive number, got 0",
    ),
    Case("plan-avg-bits-inf", lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "inf"), "avg_bits"),
    Case("plan-groups-7", lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "3", "--groups", "7"), "groups"),
    Case(
        "plan-bits-word",
        lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "3", "--bits", "2,x"),
        "--bits: 2,x is not a list of integers",
        usage=True,
    ),
    Case(
        "plan-act-bits-17",
        lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "3", "--act-bits", "17"),
        "activation bits 17 is out of range",
    ),
    Case(
        "plan-act-bits-1",
        lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "3", "--act-bits", "1"),
        "activation bits 1 is out of range",
    ),
    Case("plan-json-bits-string", lambda w, t: _quantize(w, t, _edited_plan(w, t, _bits_as("4"))), "'4'"),
    Case("plan-json-bits-9", lambda w, t: _quantize(w, t, _edited_plan(w, t, _bits_as(9))), "out of range"),
    Case(
        "plan-json-act-bits-17",
        lambda w, t: _quantize(w, t, _edited_plan(w, t, _act_bits(17))),
        "act_bits 17 is out of range",
    ),
    Case("plan-uniform-1", lambda w, t: _plan_cmd(w, t, None, "--uniform", "1"), "out of range"),
    Case(
        "plan-deploy-onnx-uniform-3",
        lambda w, t: _plan_cmd(w, t, None, "--uniform", "3", "--deploy", "onnx"),
        "3-bit weights under deploy onnx: ONNX Runtime has kernels for 2, 4, 8 bits only",
    ),
    Case(
        "plan-embedding-bits-1",
        lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "3", "--embedding-bits", "1"),
        "out of range",
    ),
    Case(
        "unknown-task-offline",
        lambda w, t: [
            "sensitivity",
            "--model",
            str(w.ckpt),
            "--task",
            "no-such-task-xyz",
            *SENS,
            "--out",
            str(t / "o"),
        ],
        "not reachable",
    ),
    # second-order rounding's settings: one line each, nothing written
    Case(
        "quantize-rounding-unknown",
        lambda w, t: _quantize(w, t, w.plan, None, "--rounding", "obq"),
        "rounding 'obq' is not known; use one of nearest, gptq",
    ),
    Case(
        "quantize-damp-0",
        lambda w, t: _quantize(w, t, w.plan, None, "--rounding", "gptq", "--damp", "0"),
        "--damp must be a positive number, got 0.0",
    ),
    Case(
        "quantize-calib-samples-above-the-data",
        lambda w, t: _quantize(w, t, w.plan, None, "--rounding", "gptq", "--calib-samples", "100000"),
        "pass --calib-samples 96 or fewer",
    ),
    Case(
        "plan-calib-samples-0",
        lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "3", "--rounding", "gptq", "--calib-samples", "0"),
        "--calib-samples must be a positive integer, got 0",
    ),
    Case(
        "plan-json-rounding-unknown",
        lambda w, t: _quantize(w, t, _edited_plan(w, t, lambda d: d.update(rounding="babai"))),
        "plan rounding 'babai' is not known",
    ),
    Case(
        "toml-rounding-unknown",
        lambda w, t: _run(w, t, _set("allocate", 'rounding = "obs"')),
        "[allocate] rounding 'obs' is not known; use one of nearest, gptq",
    ),
    # activation ranges: one line each, nothing written
    Case(
        "quantize-act-range-unknown",
        lambda w, t: _quantize(w, t, w.plan, None, "--act-range", "p99"),
        "activation range 'p99' is not known; use one of max, percentile, mse, dynamic",
    ),
    Case(
        "plan-act-range-unknown",
        lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "3", "--act-range", "minmax"),
        "--act-range 'minmax' is not known; use one of max, percentile, mse, dynamic",
    ),
    Case(
        "plan-json-act-range-unknown",
        lambda w, t: _quantize(w, t, _edited_plan(w, t, lambda d: d.update(act_range="ema"))),
        "plan act_range 'ema' is not known",
    ),
    Case(
        "toml-act-range-unknown",
        lambda w, t: _run(w, t, _set("allocate", 'act_range = "token"')),
        "[allocate] act_range 'token' is not known; use one of max, percentile, mse, dynamic",
    ),
    Case(
        "run-act-range-flag-unknown",
        lambda w, t: _run(w, t, lambda x: x, "--act-range", "99.99"),
        "act_range '99.99' is not known",
    ),
]

ALREADY = [
    Case(
        "unknown-block",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--blocks", "encoder.9", "--out", str(t / "o")],
        "block 'encoder.9' does not exist",
    ),
    Case(
        "missing-column",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--text-columns", "text", "--out", str(t / "o")],
        "column(s) text not in",
    ),
    Case(
        "draws-0",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--draws", "0", "--out", str(t / "o")],
        "draws must be a positive number",
    ),
    Case(
        "too-little-data",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--batch-size", "500", "--out", str(t / "o")],
        "a draw needs 500 training examples",
    ),
    Case(
        "length-buckets-0",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--length-buckets", "0", "--out", str(t / "o")],
        "--length-buckets must be a positive number",
    ),
    Case("missing-model", lambda w, t: ["evaluate", *w.model(t / "nope"), "--quiet"], "does not exist"),
    Case("unsupported-architecture", lambda w, t: ["evaluate", *w.model(_gpt2(t)), "--quiet"], "is not supported"),
    Case(
        "missing-data-folder",
        lambda w, t: ["evaluate", "--model", str(w.ckpt), *DATA, "--data", str(t / "nodata")],
        "data folder",
    ),
    Case("missing-dev-file", lambda w, t: _sens(w, t, _drop(_tsv(t), "dev.tsv")), "no dev file"),
    Case("empty-train-file", lambda w, t: _sens(w, t, _tsv(t, ["sentence\tlabel"])), "has no rows"),
    Case(
        "dev-label-unseen",
        lambda w, t: _sens(w, t, _tsv(t, None, ["sentence\tlabel", "good\t7"])),
        "do not occur in its training split",
    ),
    Case("infeasible-budget", lambda w, t: _plan_cmd(w, t, None, "--budget-mb", "0.0001"), "budget"),
    Case(
        "two-budgets",
        lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "3", "--ratio", "4"),
        "not allowed with",
        usage=True,
    ),
    Case("no-report", lambda w, t: _plan_cmd(w, t, t / "missing", "--avg-bits", "3"), "does not exist"),
    Case("missing-plan-file", lambda w, t: _quantize(w, t, t / "missing.json"), "does not exist"),
    Case(
        "missing-packed-folder",
        lambda w, t: ["evaluate", *w.model(), "--packed", str(t / "nope"), "--quiet"],
        "is not a packed checkpoint",
    ),
    Case(
        "sensitivity-out-exists",
        lambda w, t: ["sensitivity", *w.model(), *SENS, "--out", str(_copy(w.report, t / "o"))],
        "--resume",
    ),
    Case(
        "plan-out-exists",
        lambda w, t: [
            "plan",
            "--report",
            str(w.report),
            "--avg-bits",
            "3",
            "--out",
            str(_copy(w.plan.parent, t / "p") / "plan.json"),
        ],
        "--force",
    ),
    Case(
        "landscape-unknown-block",
        lambda w, t: ["landscape", *w.model(), "--block", "encoder.9", "--out", str(t / "o")],
        "encoder.9",
    ),
    Case(
        "landscape-radius-0",
        lambda w, t: ["landscape", *w.model(), "--block", "encoder.0", "--range", "0", "--out", str(t / "o")],
        "--range must be a positive number, got 0.0",
    ),
    Case(
        "density-unknown-block", lambda w, t: ["density", *w.model(), "--block", "nope", "--out", str(t / "o")], "nope"
    ),
    Case(
        "toml-unknown-section", lambda w, t: _run(w, t, lambda s: s + "\n[sensitivty]\n"), "unknown key(s) sensitivty"
    ),
    Case("toml-no-plans", lambda w, t: _run(w, t, lambda s: s.split("[[plans]]")[0]), "no [[plans]]"),
    Case(
        "toml-plan-bits-9",
        lambda w, t: _run(w, t, lambda s: s.replace("uniform = 4", "uniform = 9")),
        "uniform bits 9 is out of range",
    ),
    Case("toml-broken", lambda w, t: _run(w, t, lambda s: "[model\n"), "not valid TOML"),
    Case(
        "toml-missing-model",
        lambda w, t: _run(w, t, lambda s: s.replace(str(w.ckpt), str(t / "nope"))),
        "does not exist",
    ),
    Case("missing-required-flag", lambda w, t: ["sensitivity", "--model", "x"], "required", usage=True),
]


def _gpt2(tmp: Path) -> Path:
    import transformers as tf

    tf.GPT2Config(n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp / "gpt2")
    return tmp / "gpt2"


def _drop(d: Path, name: str) -> Path:
    (d / name).unlink()
    return d


def _ner(tmp: Path, edit: Callable[[Path], None]) -> Path:
    d = write_ner_dir(tmp / "ner")
    edit(d / "train.txt")
    return d


def _latin1(path: Path) -> None:
    path.write_bytes(path.read_bytes() + "caf\u00e9 NN O O\n".encode("latin-1"))


def _two_columns(path: Path) -> None:
    path.write_text(path.read_text().replace("\n\n", "\nfun O\n\n", 1))


def _bad_answer(tmp: Path) -> Path:
    d = write_squad_dir(tmp / "squad")
    data = json.loads((d / "train-v1.1.json").read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    (d / "train-v1.1.json").write_text(json.dumps(data))
    return d


def _mnli(tmp: Path, edit: Callable[[Path], object] = lambda d: None) -> Path:
    d = write_mnli_dir(tmp / "mnli")
    edit(d)
    return d


def _trained_on(w: World, tmp: Path, task: str) -> Path:
    """The world's checkpoint, as finetune records it after training on ``task``."""
    ckpt = _copy(w.ckpt, tmp / "ckpt")
    (ckpt / "metrics.json").write_text(json.dumps({"stage": "finetune", "task": task}))
    return ckpt


def _reconstructed_dev(tmp: Path) -> Path:
    d = write_squad_dir(tmp / "squad-full")
    data = json.loads((d / "dev-v1.1.json").read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["id"] = "recon-011-000-00"
    (d / "dev-v1.1.json").write_text(json.dumps(data))
    return d


def _family(w: World, tmp: Path, task: str, data: Path | None) -> list[str]:
    where = ["--data", str(data)] if data else []
    return ["evaluate", "--model", str(w.ckpt), "--task", task, *where, "--max-length", "32", "--quiet"]


FAMILIES = [
    Case("ner-not-utf8", lambda w, t: _family(w, t, "conll03", _ner(t, _latin1)), "is not UTF-8 text"),
    Case("ner-two-columns", lambda w, t: _family(w, t, "conll03", _ner(t, _two_columns)), "columns"),
    Case("squad-answer-start-off", lambda w, t: _family(w, t, "squad", _bad_answer(t)), "answer_start"),
    Case("ner-hub-offline", lambda w, t: _family(w, t, "conll03", None), "not reachable"),
    Case("squad-hub-offline", lambda w, t: _family(w, t, "squad", None), "not reachable"),
    Case(
        "ner-on-a-sentence-classifier",
        lambda w, t: _family(w, t, "conll03", write_ner_dir(t / "ner")),
        "has a trained classification head but the task is token",
    ),
    Case("mnli-local-no-data", lambda w, t: _family(w, t, "mnli-local", None), "reads local files; pass --data DIR"),
    Case(
        "mnli-local-missing-file",
        lambda w, t: _family(w, t, "mnli-local", _mnli(t, lambda d: (d / "dev_matched.tsv").unlink())),
        "no dev_matched file in",
    ),
    Case(
        "mnli-local-wrong-columns",
        lambda w, t: _family(
            w, t, "mnli-local", _mnli(t, lambda d: (d / "dev_mismatched.tsv").write_text("sentence\tlabel\na\t0\n"))
        ),
        "column(s) premise, hypothesis not in",
    ),
    Case(
        "mnli-local-scored-on-its-training-split",
        lambda w, t: (
            ["evaluate", "--model", str(_trained_on(w, t, "mnli-local")), "--task", "mnli-local-mm"]
            + ["--data", str(_mnli(t)), "--max-length", "32", "--quiet"]
        ),
        "was fine-tuned on task 'mnli-local', whose training split is the dev split of 'mnli-local-mm'",
    ),
    Case("squad-full-no-data", lambda w, t: _family(w, t, "squad-full", None), "reads local files; pass --data DIR"),
    Case(
        "squad-full-no-dev-file",
        lambda w, t: _family(w, t, "squad-full", _drop(write_squad_dir(t / "s"), "dev-v1.1.json")),
        "holds no dev*.json files",
    ),
    Case(
        "squad-full-reconstructed-dev",
        lambda w, t: _family(w, t, "squad-full", _reconstructed_dev(t)),
        "has a reconstructed id: a dev file is scored",
    ),
    Case(
        "squad-on-a-sentence-classifier",
        lambda w, t: _family(w, t, "squad", write_squad_dir(t / "squad")),
        "has a trained classification head but the task is qa",
    ),
]


def _export(w: World, tmp: Path, src: Path | None = None, out: Path | None = None, *extra: str) -> list[str]:
    return ["export", str(src or w.packed), "--format", "onnx", "--out", str(out or tmp / "deploy"), "--quiet", *extra]


def _exported(w: World, tmp: Path) -> Path:
    """An earlier ONNX export of the world's packed checkpoint."""
    assert main(_export(w, tmp)) == 0
    return tmp / "deploy"


DEPLOY = [
    Case("export-not-packed", lambda w, t: _export(w, t, w.ckpt), "is not a packed checkpoint"),
    Case(
        "export-compressed-not-packed",
        lambda w, t: ["export", str(w.ckpt), "--format", "compressed-tensors", "--out", str(t / "o")],
        "is not a packed checkpoint",
    ),
    Case("export-over-an-export", lambda w, t: _export(w, t, out=_exported(w, t)), "pass --force to replace"),
    Case(
        "export-force-foreign-folder",
        lambda w, t: _export(w, t, None, _foreign_dir(t), "--force"),
        "exists and is not an exported model",
    ),
    Case("export-out-under-file", lambda w, t: _export(w, t, out=_file(t) / "o"), "is not a writable folder"),
    Case(
        "export-exact-compressed",
        lambda w, t: ["export", str(w.packed), "--format", "compressed-tensors", "--exact", "--out", str(t / "o")],
        "--exact applies to --format onnx",
    ),
    Case(
        "evaluate-onnx-not-an-export",
        lambda w, t: ["evaluate", *w.model(), "--onnx", str(w.packed), "--quiet"],
        "is not an ONNX export",
    ),
]


def _priced_table_as(w: World, tmp: Path, name: str, measure: str) -> Path:
    """A copy of the report with a priced cost table of ``measure`` saved under ``name`` (copied or renamed by
    hand): its entries are the weight errors, its draws the report's, so only its measure is wrong."""
    from qbert_hessian.artifacts import fingerprint

    d = _copy(w.report, tmp / "report")
    report = json.loads((d / "sensitivity.json").read_text())
    table = json.loads((d / "profile.json").read_text())
    table["measure"] = measure
    table["inputs"]["draws"] = fingerprint([report["config"], [x["indices"] for x in report["draws"]]])
    (d / name).write_text(json.dumps(table))
    return d


PRICED = [
    Case(
        "plan-priced-table-of-another-measure",
        lambda w, t: _plan_cmd(
            w,
            t,
            _priced_table_as(w, t, "profile-quadratic-nearest.json", "measured"),
            "--avg-bits",
            "3",
            "--bits",
            "2,4",
            "--measure",
            "quadratic",
            "--rounding",
            "nearest",
        ),
        "the cost table holds measure measured with nearest rounding but the plan asks for measure quadratic with "
        "nearest rounding",
    ),
    Case(
        "plan-priced-without-model",
        lambda w, t: _plan_cmd(w, t, None, "--avg-bits", "3", "--measure", "measured", "--rounding", "gptq"),
        "has no cost table of measured losses with gptq rounding",
    ),
    Case(
        "plan-priced-other-model",
        lambda w, t: _plan_cmd(
            w, t, None, "--avg-bits", "3", "--measure", "quadratic", "--model", str(w.ckpt_other), "--data", str(w.data)
        ),
        "is not the report's model",
    ),
]

CASES = [*SILENT, *TYPES, *OUT_PATHS, *CORRUPT, *GAPS, *ALREADY, *FAMILIES, *DEPLOY, *PRICED]


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: its kind, size, modification time and mode."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                p = Path(dirpath) / name
                st = p.lstat()
                seen[str(p)] = (p.is_dir(), 0 if p.is_dir() else st.st_size, st.st_mtime_ns, st.st_mode)
    return seen


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return int(exc.code)


def test_the_table_has_no_duplicate_ids():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def check_case(case: Case, world: World, tmp_path: Path, capsys, *watched: Path) -> None:
    """One row of a bad-input table: the exit code, the message on the last (and, but for argparse's usage
    errors, only) line of stderr, and the world, ``watched`` folders and the case's folder untouched."""
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    argv = case.argv(world, case_dir)
    capsys.readouterr()
    before = _snapshot(world.root, *watched, case_dir)
    code = _exit_code(argv)
    err = capsys.readouterr().err
    after = _snapshot(world.root, *watched, case_dir)
    assert code == case.code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and case.message in lines[-1], err
    if not case.usage:
        assert len(lines) == 1, err
    assert after == before, "the command wrote, changed or deleted files"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path: Path, capsys):
    if case.skip:
        pytest.skip(case.skip)
    check_case(case, world, tmp_path, capsys)
