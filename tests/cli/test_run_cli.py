"""`qbert-hessian run` on the tiny model end to end: every artifact, the report table, reuse, bad configs."""

from __future__ import annotations

import json

import pytest

from qbert_hessian.cli import main
from qbert_hessian.config import PlanSpec
from qbert_hessian.errors import QBHError
from qbert_hessian.run_config import DEMO_CONFIG, apply_overrides, parse_run_config
from tests.helpers import TINY_RUN_HEAD

CONFIG = (
    TINY_RUN_HEAD
    + """
[allocate]
groups = "channel"
rounding = "nearest"  # as every run folder made before rounding was a setting (the ledger test reads them)
act_range = "max"     # likewise for activation ranges

[qat]
epochs = 2
batch_size = 16
lr = 1e-3
distill = true

[run]
calibration_batches = 2
batch_size = 8

[[plans]]
name = "uniform-4"
uniform = 4
qat = false

[[plans]]
name = "mixed-3"
avg_bits = 3.0
bits = [2, 4]

[[plans]]
name = "mixed-3-control"
avg_bits = 3.0
bits = [2, 4]
assign = "reversed"
qat = false
"""
)


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = root / "run.toml"
    cfg.write_text(CONFIG.format(model=tiny_checkpoint, data=tiny_data))
    assert main(["run", str(cfg), "--out", str(root / "out"), "--quiet"]) == 0
    return root


def test_run_writes_every_artifact(run_dir):
    out = run_dir / "out"
    for path in [
        "run.json",
        "report.md",
        "sensitivity/sensitivity.json",
        "sensitivity/sensitivity.png",
        "plans/uniform-4.json",
        "plans/uniform-4.md",
        "plans/mixed-3.json",
        "plans/frontier.png",
        "plans/frontier.json",
        "results/fp32.json",
        "results/uniform-4/direct.json",
        "results/uniform-4/metrics.json",
        "results/uniform-4/packed/model.safetensors",
        "results/mixed-3/qat.json",
        "results/mixed-3/packed/quantization.json",
        "results/mixed-3/metrics.json",
    ]:
        assert (out / path).is_file(), path
    assert not (out / "checkpoint").exists()  # the tiny checkpoint already is a classifier: no fine-tuning
    assert not (out / "results/uniform-4/qat.json").exists()
    mixed = json.loads((out / "results/mixed-3/metrics.json").read_text())
    assert mixed["qat"] and mixed["stage"] == "qat" and mixed["metrics"]["num_examples"] == 24
    assert abs(mixed["bytes"] - mixed["predicted_bytes"]) / mixed["predicted_bytes"] < 0.01


def test_run_report_table(run_dir):
    report = (run_dir / "out" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| FP32 baseline",
        "| direct, uniform",
        "| direct, mixed (milp)",
        "| QAT, mixed (milp)",
        "| direct, mixed (milp-reversed)",
    ]
    assert "| mixed-3 | 2/4 (avg 3.00) | 8 | 8 | channel |" in report or "| mixed-3 | 4 | 8 | 8 | channel |" in report
    assert "![sensitivity](sensitivity/sensitivity.png)" in report and "![frontier](plans/frontier.png)" in report
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[6] == ("-" if cells[0] == "FP32 baseline" else "nearest")  # how the weights were rounded
        assert 0 <= float(cells[7]) <= 1 and float(cells[9]) > 0 and cells[10].endswith("x")


def test_the_reversed_control_has_the_solver_plans_packed_size_and_says_what_it_is(run_dir):
    out = run_dir / "out"
    solver, control = (json.loads((out / "plans" / f"{n}.json").read_text()) for n in ("mixed-3", "mixed-3-control"))
    assert control["method"] == "milp-reversed" and control["source"]["reassigned_from"]["bits"] == {
        b: e["bits"] for b, e in solver["blocks"].items() if b.startswith("encoder.")
    }
    # The two layers have different widths; the more sensitive one gets the smaller width.
    sens = {b["name"]: b["omega"] for b in json.loads((out / "sensitivity" / "sensitivity.json").read_text())["blocks"]}
    hi, lo = sorted(["encoder.0", "encoder.1"], key=lambda b: -sens[b])
    assert (solver["blocks"][hi]["bits"], solver["blocks"][lo]["bits"]) == (4, 2)
    assert (control["blocks"][hi]["bits"], control["blocks"][lo]["bits"]) == (2, 4)
    assert control["predicted"]["objective"] > solver["predicted"]["objective"]
    # The packed files are the same size to the byte.
    sizes = [
        json.loads((out / "results" / n / "metrics.json").read_text())["bytes"] for n in ("mixed-3", "mixed-3-control")
    ]
    assert sizes[0] == sizes[1] == solver["predicted"]["bytes"] == control["predicted"]["bytes"]
    report = (out / "report.md").read_text()
    assert "**mixed (milp-reversed)**: the milp plan's widths reassigned" in report
    assert "not the solver's assignment" in (out / "plans" / "mixed-3-control.md").read_text()


def test_run_again_reuses_every_stage(run_dir, capsys):
    out = run_dir / "out"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "run.json"}
    assert main(["run", str(run_dir / "run.toml"), "--out", str(out), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "| FP32 baseline |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[model]\nname = 'x'\n", "needs 'task'"),
        ("[model]\nname = 'x'\ntask = 'sst2'\n", "no [[plans]]"),
        ("[model]\nname='x'\ntask='sst2'\n[[plans]]\nname='a'\n", "exactly one of uniform, avg_bits"),
        (
            "[model]\nname='x'\ntask='sst2'\n[[plans]]\nname='a'\nuniform=4\n[[plans]]\nname='a'\nuniform=2\n",
            "used twice",
        ),
        ("[model]\nname='x'\ntask='sst2'\n[[plans]]\nname='a'\nuniform=4\nbitz=3\n", "unknown PlanSpec key(s) bitz"),
        ("[model]\nname='x'\ntask='sst2'\n[sensitivty]\n", "unknown key(s) sensitivty"),
        (
            "[model]\nname='x'\ntask='sst2'\n[[plans]]\nname='a'\nuniform=4\nrange_method='max'\n",
            "plan 'a' sets range_method; it is one setting of the whole run",
        ),
        (
            "[model]\nname='x'\ntask='sst2'\n[allocate]\nrange_method='p99'\n[[plans]]\nname='a'\nuniform=4\n",
            "[allocate] range_method 'p99' is not known; use one of max, mse",
        ),
        ("[model]\nname='x'\ntask='sst2'\n[[plans]]\nname='a'\nuniform=9\n", "uniform bits 9 is out of range"),
        (
            "[model]\nname='x'\ntask='sst2'\n[[plans]]\nname='a'\nuniform=4\nassign='reversed'\n",
            "plan 'a': assign = \"reversed\" reassigns the widths of a budget plan",
        ),
        (
            "[model]\nname='x'\ntask='sst2'\n[[plans]]\nname='a'\nuniform=4\ndistill='teacher'\n",
            "plan 'a': [qat] distill 'teacher' is not valid; use none, logits, hidden or full",
        ),
        (
            "[model]\nname='x'\ntask='sst2'\n[[plans]]\nname='a'\nuniform=4\nlearn_scales='yes'\n",
            "[[plans]] learn_scales = 'yes' is not true/false",
        ),
        ("[model\n", "not valid TOML"),
    ],
    ids=[
        "no-task",
        "no-plans",
        "no-budget",
        "duplicate",
        "plan-key",
        "section",
        "plan-range",
        "range",
        "bits",
        "assign-uniform",
        "plan-distill",
        "plan-learn-scales",
        "toml",
    ],
)
def test_run_refuses_bad_configs(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_overrides_and_the_demo_config():
    cfg = parse_run_config(
        apply_overrides(DEMO_CONFIG, ["sensitivity.draws=2", "qat.distill=false", "model.max_length=64"])
    )
    assert cfg.sensitivity.draws == 2 and cfg.qat.distill == "none" and cfg.sensitivity.max_length == 64
    assert [p.name for p in cfg.plans] == ["uniform-4", "uniform-2", "mixed-2.5"]
    # the demo shows the defaults (GPTQ on fewer calibration articles, to keep it short)
    assert {(p.alloc.rounding, p.alloc.act_range, p.alloc.calib_samples) for p in cfg.plans} == {
        ("gptq", "dynamic", 32)
    }
    with pytest.raises(QBHError, match="section.key=value"):
        apply_overrides(DEMO_CONFIG, ["draws=2"])
    with pytest.raises(QBHError, match="unknown section"):
        apply_overrides(DEMO_CONFIG, ["plans.name=x"])


def test_run_with_a_missing_model_exits_2_and_writes_nothing(tiny_data, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG.format(model=tmp_path / "nope", data=tiny_data))
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_gptq_plan_asking_for_more_sequences_than_the_data_has_is_refused_before_any_stage(
    tiny_checkpoint, tiny_data, tmp_path, capsys
):
    """The default rounding (gptq, 128 sequences) on the tiny data (96 training sentences): one line naming both
    fixes before any stage runs (not after the sensitivity stage), nothing written."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG.replace('rounding = "nearest"', "").format(model=tiny_checkpoint, data=tiny_data))
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "qbert-hessian run: error: plan 'uniform-4': second-order rounding (gptq) asks for 128 calibration sequences "
        'but the training split has 96; set calib_samples = 96 or fewer, or rounding = "nearest" ([allocate] or the '
        "plan's own)"
    ]
    assert not (tmp_path / "out").exists()


def _copy_of(run_dir, tmp_path):
    """A copy of the module's finished run folder, for a test that changes it."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run_dir / "out", out)
    return out


def _stage_hashes(out):
    return {k: v["hash"] for k, v in json.loads((out / "run.json").read_text())["stages"].items()}


def test_rerun_with_unchanged_inputs_recomputes_nothing(run_dir, caplog):
    """A run folder written by this code, run again: no stage recomputes, no file is rewritten, the ledger keeps
    every entry and the report reads the same to the byte."""
    out = run_dir / "out"
    before = {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in ("run.json", "report.md")
    }
    hashes, report = _stage_hashes(out), (out / "report.md").read_bytes()
    with caplog.at_level("INFO", logger="qbert_hessian"):
        assert main(["run", str(run_dir / "run.toml"), "--out", str(out), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert _stage_hashes(out) == hashes and (out / "report.md").read_bytes() == report
    assert "nothing was recomputed" in caplog.text and "inputs changed" not in caplog.text


# What run.json records per stage for CONFIG, as the code before the run layer's split recorded it: the inputs'
# keys (canonical: unset settings dropped) and the artifact files hashed. A run folder made before a change here
# would recompute that stage and everything after it, so a change needs a reason (and a settings key left at its
# default must stay out of the record, see AllocConfig.protocol).
_ALLOC = "allocate.act_bits allocate.bits allocate.embedding_bits allocate.embedding_groups allocate.groups "
_ALLOC += "allocate.measure allocate.method allocate.range_method profile sensitivity"
_DIRECT = "calibration.batch_size calibration.calibration_batches calibration.seed data max_length model plan "
_DIRECT += "range_method"
_QAT = " ".join(
    f"qat.{k}"
    for k in (
        "alpha attention_weight batch_size distill epochs eval_steps group_by_length hidden_weight learn_scales lr "
        "quant_noise seed temperature warmup_ratio weight_decay"
    ).split()
)
LEDGER = {
    "sensitivity": (
        "config.batch_size config.batches_per_draw config.draws config.length_buckets config.max_iters "
        "config.max_length config.method config.most_negative config.seed config.tol config.top_k config.trace "
        "config.trace_samples config.warm_start data model",
        ["sensitivity/sensitivity.json"],
    ),
    "profile": ("groups model range_method", ["sensitivity/profile.json"]),
    "fp32": ("data max_length model", ["results/fp32.json"]),
    "plan:uniform-4": (f"{_ALLOC} spec.name spec.qat spec.uniform", ["plans/uniform-4.json"]),
    "plan:mixed-3": (f"{_ALLOC} spec.avg_bits spec.bits spec.name", ["plans/mixed-3.json"]),
    "plan:mixed-3-control": (
        f"{_ALLOC} spec.assign spec.avg_bits spec.bits spec.name spec.qat",
        ["plans/mixed-3-control.json"],
    ),
    "frontier": (_ALLOC, ["plans/frontier.json", "plans/frontier.png"]),
    **{
        f"{stage}:{name}": entry
        for name in ("uniform-4", "mixed-3", "mixed-3-control")
        for stage, entry in {
            "direct": (_DIRECT, [f"results/{name}/direct.json"]),
            "packed": (
                f"{_DIRECT} {_QAT}" if name == "mixed-3" else _DIRECT,
                [f"results/{name}/packed/model.safetensors", f"results/{name}/packed/quantization.json"],
            ),
            "metrics": ("data max_length model packed", [f"results/{name}/metrics.json"]),
        }.items()
    },
}


def _keys(value, prefix=""):
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _keys(v, f"{prefix}.{key}" if prefix else key)]
    return [prefix]


def test_the_ledger_records_what_runs_made_before_recorded(run_dir):
    from qbert_hessian.artifacts import canonical

    stages = json.loads((run_dir / "out" / "run.json").read_text())["stages"]
    assert set(stages) == set(LEDGER)
    for key, (inputs, artifacts) in LEDGER.items():
        entry = stages[key]
        assert sorted(_keys(canonical(entry["inputs"]))) == sorted(inputs.split()), key
        assert sorted(entry["artifacts"]) == artifacts, key


def test_this_nearest_folder_is_not_reused_for_the_default_rounding(run_dir):
    """This folder's TOML says rounding = "nearest" and act_range = "max", so run.json records [allocate] as folders
    made before those were settings do (the test above); the same TOML without those lines rounds by gptq and sets
    dynamic ranges, the defaults, and every plan's recorded inputs then differ from it, by those settings alone: its
    plans would be made again, not reused."""
    import tomllib

    from qbert_hessian.artifacts import canonical
    from qbert_hessian.pipeline import _changes

    stages = json.loads((run_dir / "out" / "run.json").read_text())["stages"]
    text = (run_dir / "run.toml").read_text()
    explicit = parse_run_config(tomllib.loads(text))
    gptq = parse_run_config(tomllib.loads(text.replace('rounding = "nearest"', "")))
    default = parse_run_config(tomllib.loads(text.replace('rounding = "nearest"', "").replace('act_range = "max"', "")))
    assert (explicit.allocate.rounding, default.allocate.rounding) == ("nearest", "gptq")
    assert (explicit.allocate.act_range, default.allocate.act_range) == ("max", "dynamic")
    for key in ("plan:uniform-4", "plan:mixed-3", "plan:mixed-3-control", "frontier"):
        recorded = canonical(stages[key]["inputs"]["allocate"])
        assert _changes(recorded, canonical(explicit.allocate.protocol())) == [], key
        assert _changes(recorded, canonical(gptq.allocate.protocol())) == ["rounding: None -> 'gptq'"], key
        changes = _changes(recorded, canonical(default.allocate.protocol()))
        assert changes == ["act_range: None -> 'dynamic'", "rounding: None -> 'gptq'"], key


def test_a_changed_setting_recomputes_that_stage_and_what_follows_only(run_dir, tmp_path):
    out = _copy_of(run_dir, tmp_path)
    before = _stage_hashes(out)
    args = ["run", str(run_dir / "run.toml"), "--out", str(out), "--quiet"]
    assert main([*args, "--set", "sensitivity.draws=3"]) == 0
    after = _stage_hashes(out)
    changed = {k for k in after if after[k] != before.get(k)}
    # The report, the plans and frontier made from it, and every result of those plans are redone...
    assert {"sensitivity", "plan:mixed-3", "direct:mixed-3", "packed:mixed-3", "metrics:mixed-3"} <= changed
    # ...but not the FP32 baseline, nor the cost table (same model and groupings).
    assert "fp32" not in changed and "profile" not in changed
    report = json.loads((out / "sensitivity" / "sensitivity.json").read_text())
    assert report["config"]["draws"] == 3 and len(report["blocks"][0]["eigenvalues"]) == 3
    assert "draws=3" in (out / "report.md").read_text()
    # A QAT setting redoes only the QAT plan's training and evaluation, nothing upstream.
    hashes = _stage_hashes(out)
    assert main([*args, "--set", "sensitivity.draws=3", "--set", "qat.lr=0.002"]) == 0
    final = _stage_hashes(out)
    changed = {k for k in final if final[k] != hashes.get(k)}
    assert changed == {"packed:mixed-3", "metrics:mixed-3"}
    assert json.loads((out / "results" / "mixed-3" / "qat.json").read_text())["config"]["lr"] == 0.002
    assert "lr=0.002" in (out / "report.md").read_text()


def test_a_plan_with_its_own_seed_trains_with_it_and_leaves_the_others_cached(run_dir, tmp_path):
    out = _copy_of(run_dir, tmp_path)
    before = _stage_hashes(out)
    cfg = tmp_path / "run.toml"
    extra = "\n[[plans]]\nname = 'mixed-3-seed1'\navg_bits = 3.0\nbits = [2, 4]\nseed = 1\n"
    cfg.write_text((run_dir / "run.toml").read_text() + extra)
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    after = _stage_hashes(out)
    assert {k for k in after if after[k] != before.get(k)} == {
        f"{stage}:mixed-3-seed1" for stage in ("plan", "direct", "packed", "metrics")
    }
    assert json.loads((out / "results" / "mixed-3-seed1" / "qat.json").read_text())["config"]["seed"] == 1
    assert json.loads((out / "results" / "mixed-3" / "qat.json").read_text())["config"]["seed"] == 0
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")]
        for line in (out / "report.md").read_text().splitlines()
        if line.startswith("| QAT")
    }
    assert rows[("QAT, mixed (milp)", "mixed-3-seed1")][-1] == "1" and rows[("QAT, mixed (milp)", "mixed-3")][-1] == "0"
    with pytest.raises(QBHError, match="seed must be an integer >= 0"):
        PlanSpec(name="a", uniform=4, seed=-1)


def test_a_changed_assignment_recomputes_that_plan_and_its_results_only(run_dir, tmp_path):
    out = _copy_of(run_dir, tmp_path)
    cfg = tmp_path / "run.toml"
    text = (run_dir / "run.toml").read_text()
    cfg.write_text(text.replace('assign = "reversed"', 'assign = "random"\nassign_seed = 1'))
    before = _stage_hashes(out)
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    after = _stage_hashes(out)
    name = "mixed-3-control"
    assert {k for k in after if after[k] != before.get(k)} == {
        f"{s}:{name}" for s in ("plan", "direct", "packed", "metrics")
    }
    plan = json.loads((out / "plans" / f"{name}.json").read_text())
    assert plan["method"] == "milp-random" and plan["source"]["reassigned_from"]["seed"] == 1
    assert "| direct, mixed (milp-random, seed 1) | mixed-3-control |" in (out / "report.md").read_text()


def test_a_changed_range_method_recomputes_the_profile_and_everything_after_it(run_dir, tmp_path):

    from qbert_hessian.artifacts import PackedManifest

    out = _copy_of(run_dir, tmp_path)
    before = _stage_hashes(out)
    args = ["run", str(run_dir / "run.toml"), "--out", str(out), "--quiet"]
    assert main([*args, "--weight-range", "max"]) == 0
    after = _stage_hashes(out)
    changed = {k for k in after if after[k] != before.get(k)}
    downstream = {f"{s}:{p}" for s in ("plan", "direct", "packed", "metrics") for p in ("uniform-4", "mixed-3")}
    assert {"profile", "frontier", *downstream} <= changed
    assert not changed & {"sensitivity", "fp32"}  # the report and the baseline do not depend on it
    assert json.loads((out / "sensitivity" / "profile.json").read_text())["range_method"] == "max"
    for name in ("uniform-4", "mixed-3"):
        assert json.loads((out / "plans" / f"{name}.json").read_text())["range_method"] == "max"
        manifest = PackedManifest.load(out / "results" / name / "packed" / "quantization.json")
        assert {e["range_method"] for e in manifest.tensors.values()} == {"max"}
    # The flag is the [allocate] setting: setting it there instead is the same run, so nothing is redone.
    assert main([*args, "--set", 'allocate.range_method="max"']) == 0
    assert _stage_hashes(out) == after


def test_public_api_path_without_the_cli(tiny_checkpoint, tiny_data, tmp_path):
    import torch

    from qbert_hessian import (
        AllocConfig,
        BlockMap,
        Budget,
        SensitivityConfig,
        allocate_bits,
        estimate_sensitivity,
        load_model,
        load_packed,
        load_task,
        measure_profile,
        profile_units,
        quantize_calibrated,
        save_packed,
    )

    model, tokenizer = load_model(str(tiny_checkpoint))
    task = load_task("sst2", tokenizer, data_dir=tiny_data, max_length=16)
    report = estimate_sensitivity(model, task, SensitivityConfig(draws=2, batch_size=8, max_iters=10), progress=False)
    profile = measure_profile(model, profile_units(BlockMap(model), [b.name for b in report.blocks]))
    config = AllocConfig(bits=(2, 4), groups="channel", calib_samples=32)  # the tiny data has 96 sentences
    plan = allocate_bits(report, profile, Budget(avg_bits=3), config)
    assert plan.rounding == "gptq"  # the default: quantize_calibrated rounds by it on the task's training split
    q = quantize_calibrated(model, plan, task, num_batches=1, batch_size=8)
    batch = task.batch("train", range(8))
    save_packed(q, tmp_path / "packed", plan=plan, tokenizer=tokenizer)
    assert (tmp_path / "packed" / "model.safetensors").stat().st_size == plan.predicted["bytes"]
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "packed")(**batch).logits, q.eval()(**batch).logits)


def test_a_run_recorded_before_a_setting_existed_stays_cached(run_dir, tmp_path, caplog):
    """A stage recorded before an optional setting was added (its entry absent, not null) is still reused, and a
    list recorded in JSON equals the tuple a config holds; a real change is named in the log."""

    from qbert_hessian.artifacts import canonical, fingerprint
    from qbert_hessian.pipeline import _changes

    out = _copy_of(run_dir, tmp_path)
    record = json.loads((out / "run.json").read_text())
    for key, entry in record["stages"].items():
        if key.startswith("plan:"):  # as written before assign / assign_seed existed
            entry["inputs"]["spec"] = {
                k: v for k, v in entry["inputs"]["spec"].items() if k not in ("assign", "assign_seed") or v is not None
            }
            entry["hash"] = fingerprint(entry["inputs"])
    (out / "run.json").write_text(json.dumps(record))
    before = _stage_hashes(out)
    with caplog.at_level("INFO", logger="qbert_hessian"):
        assert main(["run", str(run_dir / "run.toml"), "--out", str(out), "--quiet"]) == 0
    assert _stage_hashes(out) == before
    assert "inputs changed" not in caplog.text

    assert (
        _changes(canonical({"bits": (2, 3), "epochs": 1, "seed": None}), canonical({"bits": [2, 3], "epochs": 1.0}))
        == []
    )
    assert _changes(canonical({"qat": True, "bits": [2, 3]}), canonical({"qat": 1, "bits": [2, 4], "new": 5})) == [
        "bits: [2, 3] -> [2, 4]",
        "new: None -> 5",
        "qat: True -> 1",
    ]


def test_a_plan_with_its_own_qat_recipe_trains_with_it_and_its_row_says_so(run_dir, tmp_path):
    out = _copy_of(run_dir, tmp_path)
    before = _stage_hashes(out)
    cfg = tmp_path / "run.toml"
    extra = "\n[[plans]]\nname = 'mixed-3-ablation'\navg_bits = 3.0\nbits = [2, 4]\n"
    extra += "distill = 'logits'\nlearn_scales = true\n"
    cfg.write_text((run_dir / "run.toml").read_text() + extra)
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    after = _stage_hashes(out)
    assert {k for k in after if after[k] != before.get(k)} == {
        f"{stage}:mixed-3-ablation" for stage in ("plan", "direct", "packed", "metrics")
    }
    ablation = json.loads((out / "results" / "mixed-3-ablation" / "qat.json").read_text())["config"]
    run_recipe = json.loads((out / "results" / "mixed-3" / "qat.json").read_text())["config"]
    assert (ablation["distill"], ablation["learn_scales"]) == ("logits", True)
    assert (run_recipe["distill"], run_recipe["learn_scales"]) == ("logits", False)  # [qat] distill = true
    report = (out / "report.md").read_text()
    assert "| QAT (distill logits, learned steps), mixed (milp) | mixed-3-ablation |" in report
    assert "| QAT, mixed (milp) | mixed-3 |" in report


def test_deploy_onnx_plans_and_the_onnx_export_stage(run_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="the deploy extra: pip install 'qbert_hessian[deploy]'")
    out = _copy_of(run_dir, tmp_path)
    before = _stage_hashes(out)
    args = ["run", str(run_dir / "run.toml"), "--out", str(out), "--quiet"]
    args += ["--set", 'allocate.deploy="onnx"', "--set", 'run.export=["onnx"]']
    assert main(args) == 0
    after = _stage_hashes(out)
    assert after["profile"] == before["profile"] and after["fp32"] == before["fp32"]
    for name in ("uniform-4", "mixed-3", "mixed-3-control"):
        assert after[f"plan:{name}"] != before[f"plan:{name}"]  # priced for the ONNX file now
        predicted = json.loads((out / "plans" / f"{name}.json").read_text())["predicted"]
        onnx_file = out / "results" / name / "onnx" / "onnx" / "model.onnx"
        assert predicted["deploy"] == "onnx"
        assert abs(predicted["bytes"] - onnx_file.stat().st_size) <= predicted["onnx_tolerance_bytes"]
        scored = json.loads((out / "results" / name / "onnx.json").read_text())
        assert scored["stage"] == "onnx" and scored["bytes"] == onnx_file.stat().st_size
        assert scored["predicted_bytes"] == predicted["bytes"] and 0 <= scored["metrics"]["accuracy"] <= 1
    report = (out / "report.md").read_text()
    assert "| direct as ONNX int8, uniform | uniform-4 |" in report and "| QAT as ONNX int8, mixed (milp) |" in report
    # Unchanged inputs: the exports and their scores are reused.
    hashes = _stage_hashes(out)
    onnx_mtime = (out / "results" / "mixed-3" / "onnx" / "onnx" / "model.onnx").stat().st_mtime_ns
    assert main(args) == 0
    assert _stage_hashes(out) == hashes
    assert (out / "results" / "mixed-3" / "onnx" / "onnx" / "model.onnx").stat().st_mtime_ns == onnx_mtime
    # An unknown format is refused in one line.
    assert main([*args[:5], "--set", 'run.export=["tflite"]']) == 2
