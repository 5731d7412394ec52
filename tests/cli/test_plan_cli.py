"""plan -> quantize -> evaluate as typed, on the tiny checkpoint; bad plans exit 2 and write nothing."""

from __future__ import annotations

import json

import pytest

from qbert_hessian.cli import main

DATA = ["--task", "sst2", "--max-length", "16", "--quiet"]


@pytest.fixture(scope="module")
def report_dir(tiny_checkpoint, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sens") / "report"
    args = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *DATA, "--out", str(out)]
    assert main([*args, "--draws", "2", "--batch-size", "8", "--max-iters", "10", "--trace-samples", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def plan_file(report_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    rc = main(
        [
            "plan",
            "--report",
            str(report_dir),
            "--avg-bits",
            "3",
            "--bits",
            "2,3,4",
            "--groups",
            "channel",
            "--frontier",
            "--calib-samples",  # rounding by gptq, the default, on what the tiny data has (96 sentences)
            "32",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    return out


def test_sensitivity_writes_the_quantization_profile_beside_the_report(report_dir):
    assert "quantization" not in json.loads((report_dir / "sensitivity.json").read_text())
    prof = json.loads((report_dir / "profile.json").read_text())
    assert prof["schema"] == "qbert_hessian.profile/1"
    assert set(prof["units"]) == {
        "encoder.0",
        "encoder.1",
        "embeddings.word",
        "embeddings.position",
        "embeddings.token_type",
    }
    assert set(prof["units"]["encoder.0"]["groups"]) == {"1", "channel"}  # 37-row FFN: no heads, no 128
    assert set(prof["units"]["encoder.0"]["unavailable"]) == {"heads", "128"}


def test_plan_writes_plan_markdown_and_frontier(plan_file, capsys):
    plan = json.loads(plan_file.read_text())
    assert plan["schema"] == "qbert_hessian.plan/1" and plan["method"] == "milp"
    assert plan["budget"] == {"avg_bits": 3.0}
    assert plan["rounding"] == "gptq" and plan["gptq"]["calib_samples"] == 32  # the default rounding
    assert plan["predicted"]["encoder_avg_bits"] <= 3.0 + 1e-9
    assert {b: e["bits"] for b, e in plan["blocks"].items()}.keys() >= {"encoder.0", "encoder.1", "embeddings.word"}
    assert len(plan["source"]["sha256"]) == 64
    names = sorted(p.name for p in plan_file.parent.iterdir())
    assert names == ["frontier.json", "frontier.png", "plan.json", "plan.md"]
    assert "| `encoder.0` |" in (plan_file.parent / "plan.md").read_text()


def test_quantize_then_evaluate_fp32_direct_and_packed(tiny_checkpoint, tiny_data, plan_file, tmp_path, capsys):
    packed, metrics = tmp_path / "packed", tmp_path / "metrics.json"
    common = [
        "--plan",
        str(plan_file),
        "--data",
        str(tiny_data),
        *DATA,
        "--batch-size",
        "8",
        "--calibration-batches",
        "2",
    ]
    assert main(["quantize", "--model", str(tiny_checkpoint), *common, "--out", str(packed)]) == 0
    assert {"model.safetensors", "quantization.json", "config.json", "size.json", "tokenizer.json"} <= {
        p.name for p in packed.iterdir()
    }
    size = json.loads((packed / "size.json").read_text())
    assert size["packed_bytes"] == size["predicted_bytes"] and size["compression"] > 1.5
    rc = main(["evaluate", "--model", str(tiny_checkpoint), *common, "--packed", str(packed), "--out", str(metrics)])
    assert rc == 0
    rows = json.loads(metrics.read_text())["results"]
    assert [r["kind"] for r in rows] == ["fp32", "direct", "packed"]
    direct, from_file = rows[1], rows[2]
    assert direct["accuracy"] == from_file["accuracy"] and direct["loss"] == pytest.approx(from_file["loss"], abs=1e-6)
    assert "| fp32 | fp32 |" in capsys.readouterr().out


def test_plan_weight_range_measures_or_refuses_a_profile_of_another_method(
    report_dir, tiny_checkpoint, tmp_path, capsys
):
    import shutil

    report = tmp_path / "report"
    shutil.copytree(report_dir, report)
    mse = json.loads((report / "profile.json").read_text())
    assert mse["range_method"] == "mse"  # what sensitivity measures by default
    out = tmp_path / "max.json"
    args = ["plan", "--report", str(report), "--avg-bits", "3", "--bits", "2,3,4", "--groups", "channel"]
    args += ["--out", str(out), "--quiet"]
    assert main([*args, "--weight-range", "max"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was measured with mse ranges, the plan asks for max; pass --model" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main([*args, "--weight-range", "max", "--model", str(tiny_checkpoint)]) == 0
    plan, measured = json.loads(out.read_text()), json.loads((report / "profile.json").read_text())
    assert plan["range_method"] == measured["range_method"] == "max"
    assert "weight ranges chosen by max" in out.with_suffix(".md").read_text()
    # The table was measured again: max never beats the mse search, and at these widths it loses somewhere.
    pairs = [
        (measured["units"][u]["groups"][g]["error"][b], e)
        for u, unit in mse["units"].items()
        for g, cost in unit["groups"].items()
        for b, e in cost["error"].items()
    ]
    assert all(m >= e * (1 - 1e-6) for m, e in pairs) and any(m > 1.01 * e for m, e in pairs)
    assert main([*args, "--force"]) == 2  # the default (mse) now needs the model in turn
    assert "was measured with max ranges, the plan asks for mse" in capsys.readouterr().err


def test_quantize_weight_range_overrides_the_plan_and_the_manifest_says_so(
    tiny_checkpoint, tiny_data, plan_file, tmp_path
):
    from safetensors.torch import load_file

    from qbert_hessian.artifacts import PackedManifest

    assert json.loads(plan_file.read_text())["range_method"] == "mse"
    args = ["quantize", "--model", str(tiny_checkpoint), "--plan", str(plan_file), "--data", str(tiny_data), *DATA]
    args += ["--batch-size", "8", "--calibration-batches", "2"]
    scales = {}
    for method in (None, "max"):
        out = tmp_path / str(method)
        assert main([*args, "--out", str(out), *(["--weight-range", method] if method else [])]) == 0
        manifest = PackedManifest.load(out / "quantization.json")
        want = method or "mse"
        assert manifest.plan.range_method == want
        assert {e["range_method"] for e in manifest.tensors.values()} == {want}
        size = json.loads((out / "size.json").read_text())
        assert size["packed_bytes"] == size["predicted_bytes"]  # a range method changes no stored tensor's size
        stored = load_file(str(out / "model.safetensors"))
        scales[want] = {k: v for k, v in stored.items() if k.endswith(".scale")}
    assert manifest.plan.notes[-1].startswith("quantized with max ranges; the plan was made with mse")
    assert any(not scales["max"][k].equal(scales["mse"][k]) for k in scales["mse"])


def _write_plan(path, plan_file, **changes):
    plan = json.loads(plan_file.read_text())
    for key, value in changes.items():
        if key == "blocks":
            plan["blocks"].update(value)
        else:
            plan[key] = value
    path.write_text(json.dumps(plan))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"blocks": {"encoder.9": {"bits": 4, "groups": 1}}}, "block 'encoder.9' does not exist"),
        ({"blocks": {"encoder.0": {"bits": 1, "groups": 1}}}, "bits 1 is out of range; use an integer from 2 to 8"),
        ({"blocks": {"encoder.0": {"bits": 9, "groups": 1}}}, "bits 9 is out of range; use an integer from 2 to 8"),
        ({"blocks": {"encoder.0": {"bits": 4, "groups": "heads"}}}, "groups=heads do not divide"),
        ({"model": {"num_layers": 12, "num_heads": 12, "hidden_size": 768}}, "plan was made for another model"),
        ({"schema": "qbert_hessian.plan/2"}, "this version reads qbert_hessian.plan/1"),
        ({"range_method": "minmax"}, "plan range_method 'minmax' is not known; use one of max, mse"),
        ("malformed", "is not valid JSON"),
    ],
    ids=["unknown-block", "bits-1", "bits-9", "bad-groups", "other-model", "schema", "range-method", "malformed"],
)
def test_quantize_refuses_bad_plans_and_writes_nothing(
    tiny_checkpoint, tiny_data, plan_file, tmp_path, capsys, change, message
):
    bad = tmp_path / "bad.json"
    if change == "malformed":
        bad.write_text('{"schema": "qbert_hessian.plan/1", "blocks": {')
    else:
        _write_plan(bad, plan_file, **change)
    out = tmp_path / "packed"
    rc = main(
        [
            "quantize",
            "--model",
            str(tiny_checkpoint),
            "--plan",
            str(bad),
            "--data",
            str(tiny_data),
            *DATA,
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "packed.saving").exists()


def test_plan_refuses_infeasible_budget_and_partial_reports(report_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(
        [
            "plan",
            "--report",
            str(report_dir),
            "--budget-mb",
            "0.001",
            "--groups",
            "channel",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 2 and "infeasible: the smallest plan with bits 2,3,4,8 is" in capsys.readouterr().err
    assert not out.exists()
    rc = main(
        ["plan", "--report", str(report_dir), "--avg-bits", "3", "--groups", "heads", "--out", str(out), "--quiet"]
    )
    assert rc == 2 and "groups=heads do not divide" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--report", str(report_dir), "--out", str(out)])
    assert exc.value.code == 2
    assert not out.exists()


def test_plan_assign_writes_a_control_of_the_same_size_or_refuses_a_uniform_one(
    report_dir, plan_file, tmp_path, capsys
):
    args = ["plan", "--report", str(report_dir), "--avg-bits", "3", "--bits", "2,3,4", "--groups", "channel"]
    out = tmp_path / "random-2.json"
    assert main([*args, "--assign", "random", "--assign-seed", "2", "--out", str(out), "--quiet"]) == 0
    solver, control = json.loads(plan_file.read_text()), json.loads(out.read_text())
    assert control["method"] == "milp-random" and control["source"]["reassigned_from"]["seed"] == 2
    assert control["predicted"]["bytes"] == solver["predicted"]["bytes"]
    assert control["predicted"]["objective"] >= solver["predicted"]["objective"]
    assert " (milp-random, avg_bits=3.0)\n" in capsys.readouterr().out
    out = tmp_path / "bad.json"
    assert main(["plan", "--report", str(report_dir), "--uniform", "4", "--assign", "reversed", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "a uniform plan gives every block the same width; drop assign" in err and len(err.splitlines()) == 1
    assert main([*args, "--assign-seed", "2", "--out", str(out)]) == 2
    assert 'assign_seed seeds assign = "random"' in capsys.readouterr().err
    assert not out.exists()


def test_landscape_and_density_commands(tiny_checkpoint, tiny_data, tmp_path, capsys):
    out = tmp_path / "ls"
    common = ["--model", str(tiny_checkpoint), "--data", str(tiny_data), *DATA, "--batch-size", "8"]
    args = ["landscape", *common, "--block", "encoder.0,encoder.1", "--grid", "3", "--batches", "1", "--out", str(out)]
    assert main(args) == 0
    for b in ("encoder.0", "encoder.1"):
        data = json.loads((out / b / "landscape.json").read_text())
        assert data["schema"] == "qbert_hessian.landscape/1" and len(data["loss"]) == 3 and None not in data["loss"][0]
        assert (out / b / "landscape.png").stat().st_size > 5000
    assert (out / "panels.png").is_file()
    assert main(args) == 2 and "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished landscapes are kept as they are
    assert main(["landscape", *common, "--block", "encoder.9", "--out", str(tmp_path / "x")]) == 2
    assert "encoder.9" in capsys.readouterr().err and not (tmp_path / "x").exists()

    dens = tmp_path / "dens"
    assert main(["density", *common, "--block", "encoder.1", "--steps", "0", "--out", str(dens)]) == 2
    assert "steps must be a positive number, got 0" in capsys.readouterr().err and not dens.exists()
    assert main(["density", *common, "--block", "encoder.1.ffn_out", "--steps", "12", "--out", str(dens)]) == 0
    data = json.loads((dens / "density.json").read_text())
    assert data["densities"][0]["steps"] == 12 and len(data["densities"][0]["nodes"][0]) == 12
    d = data["densities"][0]
    mean = sum(sum(w * x for w, x in zip(ws, xs)) for xs, ws in zip(d["nodes"], d["weights"])) / len(d["nodes"])
    printed = capsys.readouterr().out.split("mean eigenvalue (trace/n) ")[1].split()[0]
    assert printed != "nan" and float(printed) == pytest.approx(mean, rel=1e-3)
    assert (dens / "density.png").is_file()


def test_plan_deploy_onnx_prices_the_onnx_file_with_widths_onnx_runtime_runs(report_dir, tmp_path, capsys):
    out = tmp_path / "onnx.json"
    args = ["plan", "--report", str(report_dir), "--avg-bits", "3", "--groups", "channel", "--quiet"]
    assert main([*args, "--deploy", "onnx", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert {b["bits"] for b in plan["blocks"].values()} <= {2, 4, 8}  # 3 is not a candidate
    assert plan["predicted"]["deploy"] == "onnx" and plan["predicted"]["packed_bytes"] < plan["predicted"]["bytes"]
    assert "predicted size of the ONNX export" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "packed.json")]) == 0
    assert "deploy" not in json.loads((tmp_path / "packed.json").read_text())["predicted"]
