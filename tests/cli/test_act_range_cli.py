"""``--act-range`` as typed: plan records it, quantize applies (or overrides) it and the packed file names it,
evaluate scores the packed file, and run treats it as a stage input only away from max (what run folders made before
the setting used; the default is dynamic)."""

from __future__ import annotations

import json

import pytest

from qbert_hessian.cli import main
from tests.helpers import TINY_RUN_HEAD

DATA = ["--task", "sst2", "--max-length", "16", "--quiet"]


@pytest.fixture(scope="module")
def report_dir(tiny_checkpoint, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sens") / "report"
    args = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *DATA, "--out", str(out)]
    assert main([*args, "--draws", "2", "--batch-size", "8", "--max-iters", "10", "--trace-samples", "2"]) == 0
    return out


def _quantize(tiny_checkpoint, tiny_data, plan, out, *extra: str) -> int:
    args = ["quantize", "--model", str(tiny_checkpoint), "--plan", str(plan), "--data", str(tiny_data), *DATA]
    return main([*args, "--batch-size", "8", "--calibration-batches", "2", "--out", str(out), *extra])


def test_plan_quantize_and_evaluate_with_each_activation_range(
    report_dir, tiny_checkpoint, tiny_data, tmp_path, capsys
):
    from safetensors.torch import load_file

    from qbert_hessian.artifacts import PackedManifest

    args = ["plan", "--report", str(report_dir), "--uniform", "8", "--groups", "channel", "--quiet"]
    args += ["--calib-samples", "32"]  # rounded by gptq, the default, on what the tiny data has (96 sentences)
    assert main([*args, "--out", str(tmp_path / "default.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "max.json"), "--act-range", "max"]) == 0
    assert main([*args, "--out", str(tmp_path / "mse.json"), "--act-range", "mse"]) == 0
    plans = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("default", "max", "mse")}
    assert {n: p["act_range"] for n, p in plans.items()} == {"default": "dynamic", "max": "max", "mse": "mse"}
    assert "activations: 8 bits (dynamic: per token)" in (tmp_path / "default.md").read_text()
    assert "activations: 8 bits (mse: MSE clipping)" in (tmp_path / "mse.md").read_text()
    assert "activations: 8 bits;" in (tmp_path / "max.md").read_text()
    # the default plan stores no ranges and its predicted size says so: the packed file is that size to the byte
    out = tmp_path / "packed-default"
    assert _quantize(tiny_checkpoint, tiny_data, tmp_path / "default.json", out) == 0
    assert PackedManifest.load(out / "quantization.json").plan.act_range == "dynamic"
    assert not [k for k in load_file(str(out / "model.safetensors")) if k.endswith(".act.amax")]
    size = json.loads((out / "size.json").read_text())
    assert size["packed_bytes"] == size["predicted_bytes"]
    ranges = {}
    for name, plan, extra in (
        ("max", "max.json", []),
        ("mse", "mse.json", []),
        ("percentile", "max.json", ["--act-range", "percentile"]),
        ("dynamic", "max.json", ["--act-range", "dynamic"]),
    ):
        out = tmp_path / f"packed-{name}"
        assert _quantize(tiny_checkpoint, tiny_data, tmp_path / plan, out, *extra) == 0
        manifest = PackedManifest.load(out / "quantization.json")
        assert manifest.plan.act_range == name
        if extra:
            assert manifest.plan.notes[-1].startswith(f"activation ranges set by {name}; the plan was made with max")
        size = json.loads((out / "size.json").read_text())
        tensors = load_file(str(out / "model.safetensors"))
        amax = {k: float(v) for k, v in tensors.items() if k.endswith(".act.amax")}
        ranges[name] = amax
        if name == "dynamic":  # nothing stored; the plan's prediction counted the stored ranges (and says so)
            assert not amax and size["packed_bytes"] < size["predicted_bytes"]
            assert "predicted size is the file's with a stored range per quantized linear" in manifest.plan.notes[-1]
        else:
            assert len(amax) == 12 and size["packed_bytes"] == size["predicted_bytes"]
    assert ranges["max"] != ranges["mse"] and ranges["max"] != ranges["percentile"]
    capsys.readouterr()
    ev = ["evaluate", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *DATA]
    assert main([*ev, "--packed", str(tmp_path / "packed-dynamic"), "--packed", str(tmp_path / "packed-mse")]) == 0
    out = capsys.readouterr().out
    assert "packed-dynamic | packed |" in out and "packed-mse | packed |" in out


RUN = (
    TINY_RUN_HEAD
    + """
[allocate]
groups = "channel"
calib_samples = 32

[run]
calibration_batches = 2
batch_size = 8
qat = false
frontier = false

[[plans]]
name = "uniform-8"
uniform = 8

[[plans]]
name = "uniform-8-max"
uniform = 8
act_range = "max"
"""
)


def test_run_sets_ranges_as_plans_say_and_caches_by_act_range(tiny_checkpoint, tiny_data, tmp_path):
    from qbert_hessian.artifacts import PackedManifest, RunRecord, canonical
    from qbert_hessian.stages import WEIGHTS_FILE

    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN.format(model=tiny_checkpoint, data=tiny_data))
    out = tmp_path / "out"
    args = ["run", str(cfg), "--out", str(out), "--quiet"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    gptq = "gptq (32 seq, damp 0.01)"  # the default rounding
    assert f"| direct, uniform | uniform-8 | 8 | 8 | 8 (dynamic) | channel | {gptq} |" in report  # the default
    assert f"| direct, uniform | uniform-8-max | 8 | 8 | 8 | channel | {gptq} |" in report
    stages = RunRecord.load(out / "run.json").stages
    # a plan at max records no act_range among its inputs: run folders made before the setting still match
    for key in ("direct:uniform-8-max", "packed:uniform-8-max"):
        assert "act_range" not in json.dumps(canonical(stages[key]["inputs"]))
    # one at the default records it, so no folder made with max passes for it
    assert stages["direct:uniform-8"]["inputs"]["act_range"] == "dynamic"
    assert stages["plan:uniform-8"]["inputs"]["allocate"]["act_range"] == "dynamic"
    packed = out / "results" / "uniform-8" / "packed" / "quantization.json"
    assert PackedManifest.load(packed).plan.act_range == "dynamic"
    before = {k: v["hash"] for k, v in stages.items()}
    # --act-range overrides [allocate]: the default plan is redone with mse. The max plan keeps its own range but
    # records [allocate] as its source, so it is planned and packed again: to the same bytes, so its metrics
    # stand.
    assert main([*args, "--act-range", "mse"]) == 0
    after = {k: v["hash"] for k, v in RunRecord.load(out / "run.json").stages.items()}
    changed = {k for k in after if after[k] != before.get(k)}
    redone = {f"{s}:uniform-8" for s in ("plan", "direct", "packed", "metrics")}
    # (its metrics are re-scored when the repacked file's bytes differ at all: they usually do not)
    assert changed - {"metrics:uniform-8-max"} == redone | {f"{s}:uniform-8-max" for s in ("plan", "direct", "packed")}
    weights = f"results/uniform-8-max/packed/{WEIGHTS_FILE}"
    now = RunRecord.load(out / "run.json").stages["packed:uniform-8-max"]["artifacts"][weights]
    assert ("metrics:uniform-8-max" in changed) == (now != stages["packed:uniform-8-max"]["artifacts"][weights])
    assert json.loads((out / "plans" / "uniform-8.json").read_text())["act_range"] == "mse"
