"""``qbert-hessian export`` and ``evaluate --onnx`` as a person types them, and the missing extra's one line."""

from __future__ import annotations

import json
import os
import sys

import pytest

from qbert_hessian.cli import main

pytest.importorskip("onnxruntime", reason="the deploy extra: pip install 'qbert_hessian[deploy]'")

DATA = ["--task", "sst2", "--max-length", "16"]


@pytest.fixture(scope="module")
def packed(tiny_checkpoint, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy_cli")
    model = ["--model", str(tiny_checkpoint), *DATA, "--data", str(tiny_data)]
    plan = root / "plan.json"
    assert (
        main(
            [
                "plan",
                "--report",
                str(_report(model, root)),
                "--uniform",
                "3",
                "--groups",
                "channel",
                "--calib-samples",  # rounding by gptq, the default, on what the tiny data has (96 sentences)
                "32",
                "--out",
                str(plan),
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["quantize", *model, "--plan", str(plan), "--out", str(root / "packed"), "--quiet"]) == 0
    return model, root


def _report(model, root):
    sens = ["--draws", "2", "--batch-size", "8", "--max-iters", "4", "--trace-samples", "2", "--quiet"]
    assert main(["sensitivity", *model, *sens, "--out", str(root / "report")]) == 0
    return root / "report"


def test_export_onnx_then_evaluate_scores_it_like_the_packed_model(packed, capsys):
    model, root = packed
    out = root / "deploy"
    assert main(["export", str(root / "packed"), "--format", "onnx", "--exact", "--out", str(out), "--quiet"]) == 0
    assert (out / "onnx" / "model.onnx").is_file() and (out / "config.json").is_file()
    meta = json.loads((out / "export.json").read_text())
    assert meta["mode"] == "exact" and {w["stored_bits"] for w in meta["weights"].values()} <= {4, 8}
    capsys.readouterr()
    result = root / "eval.json"
    packed_model = ["--model", str(root / "packed"), *model[2:]]
    assert main(["evaluate", *packed_model, "--onnx", str(out), "--out", str(result), "--quiet"]) == 0
    rows = json.loads(result.read_text())["results"]
    assert [r["kind"] for r in rows] == ["packed", "onnx-exact"]
    assert rows[1]["accuracy"] == rows[0]["accuracy"]
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], abs=1e-4)
    # replaced only with --force, and then entirely
    assert main(["export", str(root / "packed"), "--format", "onnx", "--out", str(out), "--force", "--quiet"]) == 0
    assert json.loads((out / "export.json").read_text())["mode"] == "int8"
    assert not (root / "deploy.saving").exists()


def test_export_compressed_tensors_writes_a_hugging_face_folder(packed):
    pytest.importorskip("compressed_tensors")
    _, root = packed
    out = root / "hf"
    assert main(["export", str(root / "packed"), "--format", "compressed-tensors", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("fmt", "module"), [("onnx", "onnxruntime"), ("onnx", "onnx"), ("compressed-tensors", "compressed_tensors")]
)
def test_a_missing_extra_is_one_line_naming_the_install(packed, fmt, module, monkeypatch, capsys, tmp_path):
    _, root = packed
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when the package is not installed
    capsys.readouterr()
    code = main(["export", str(root / "packed"), "--format", fmt, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"needs {module}" in err[0] and "pip install 'qbert_hessian[deploy]'" in err[0]
    assert os.listdir(tmp_path) == []
