"""The commands as a person types them: happy paths on the tiny model, bad inputs -> exit 2 and no output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qbert_hessian.cli import main

SENS = [
    "--task",
    "sst2",
    "--draws",
    "2",
    "--batch-size",
    "8",
    "--max-iters",
    "10",
    "--max-length",
    "16",
    "--trace-samples",
    "2",
    "--quiet",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qbert_hessian.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_sensitivity_cli_writes_the_report_and_the_cost_table(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "report"
    proc = run_cli("sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "profile.json",
        "sensitivity.csv",
        "sensitivity.json",
        "sensitivity.md",
        "sensitivity.png",
    ]
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["schema"] == "qbert_hessian.sensitivity/1" and data["complete"] and data["task"] == "sst2"
    assert [b["name"] for b in data["blocks"]] == ["embeddings", "encoder.0", "encoder.1"]
    assert data["config"]["draws"] == 2 and len(data["draws"]) == 2 and len(data["draws"][0]["indices"]) == 8
    for b in data["blocks"]:
        assert len(b["eigenvalues"]) == 2 and b["omega"] == pytest.approx(abs(b["mean"]) + b["std"])
        assert b["trace"]["samples"] == 4 and b["num_params"] > 0 and b["seconds"] > 0
    assert "Omega" in proc.stdout and "| 1 |" in proc.stdout


def test_sensitivity_cli_maps_blocks_to_modules_once(tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    """One BlockMap per command, passed down to the protocol and the cost table (which measures every unit)."""
    from qbert_hessian.models import BlockMap

    built = []
    real_init = BlockMap.__init__

    def counting_init(self, model):
        built.append(model)
        real_init(self, model)

    monkeypatch.setattr(BlockMap, "__init__", counting_init)
    out = tmp_path / "once"
    args = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS, "--draws", "1"]
    assert main([*args, "--blocks", "encoder.0", "--out", str(out)]) == 0
    assert len(built) == 1
    assert "embeddings.word" in json.loads((out / "profile.json").read_text())["units"]


def test_sensitivity_cli_hutchpp_traces_are_named_in_the_report(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "hpp"
    args = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS[:-3], "--quiet"]
    assert (
        main([*args, "--trace-method", "hutchpp", "--trace-samples", "6", "--blocks", "encoder.0", "--out", str(out)])
        == 0
    )
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["config"]["trace_method"] == "hutchpp"
    (block,) = data["blocks"]
    assert block["trace"]["method"] == "hutchpp" and block["trace"]["products"] == 12  # 2 draws x 6
    assert "trace: block (hutchpp, 6 products per draw)" in (out / "sensitivity.md").read_text()
    assert "hutchpp" in (out / "sensitivity.csv").read_text().splitlines()[1]


def test_sensitivity_cli_mixed_precision_is_recorded(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "mixed"
    args = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS[:-3], "--quiet"]
    assert main([*args, "--precision", "mixed", "--blocks", "encoder.0", "--out", str(out)]) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["config"]["precision"] == "mixed"
    assert "products: bf16 search, every eigenvalue checked in float32" in (out / "sensitivity.md").read_text()


def test_sensitivity_cli_resume_skips_finished_blocks(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "r"
    args = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS, "--out", str(out)]
    assert main(args) == 0
    path = out / "sensitivity.json"
    full = json.loads(path.read_text())
    # Simulate an interruption after the first block: what an interrupted run leaves on disk.
    partial = dict(full, blocks=full["blocks"][:1], pending=["encoder.0", "encoder.1"], complete=False)
    path.write_text(json.dumps(partial))
    assert main(args) == 2  # refuses to overwrite without --resume or --force
    assert main([*args, "--resume"]) == 0
    resumed = json.loads(path.read_text())
    assert resumed["complete"] and resumed["blocks"][0] == full["blocks"][0]
    for a, b in zip(resumed["blocks"], full["blocks"]):
        assert a["eigenvalues"] == pytest.approx(b["eigenvalues"], rel=1e-6)
    assert main([*args, "--resume", "--draws", "3"]) == 2  # other settings: cannot resume


def test_sensitivity_cli_resumes_an_interrupted_draw_with_the_same_numbers(
    tiny_checkpoint, tiny_data, tmp_path, monkeypatch
):
    """Ctrl-C in the middle of the second draw: the first draw of every block is kept (report and state on disk)
    and --resume finishes with the numbers of a run never stopped; the state file is gone afterwards."""
    import qbert_hessian.sensitivity as sensitivity
    from qbert_hessian.stages import SENSITIVITY_STATE_FILE

    base = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "sensitivity.json").read_text())
    assert not (tmp_path / "whole" / SENSITIVITY_STATE_FILE).exists()

    out = tmp_path / "stopped"
    args = [*base, "--out", str(out)]
    solve, calls = sensitivity._solve_draw, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # the second draw of the second block (3 blocks per draw)
            raise KeyboardInterrupt
        return solve(*a, **k)

    monkeypatch.setattr(sensitivity, "_solve_draw", interrupted)
    assert main(args) == 130
    monkeypatch.setattr(sensitivity, "_solve_draw", solve)
    stopped = json.loads((out / "sensitivity.json").read_text())
    assert stopped["pending"] == ["embeddings", "encoder.0", "encoder.1"] and not stopped["complete"]
    assert (out / SENSITIVITY_STATE_FILE).exists()
    assert main([*args, "--resume"]) == 0
    resumed = json.loads((out / "sensitivity.json").read_text())
    assert resumed["complete"] and not (out / SENSITIVITY_STATE_FILE).exists()
    for a, b in zip(resumed["blocks"], whole["blocks"]):
        assert a["eigenvalues"] == b["eigenvalues"] and a["trace"]["mean"] == b["trace"]["mean"]

    # A torn state file is not resumed from: the pending blocks start over (same numbers, a warning).
    monkeypatch.setattr(sensitivity, "_solve_draw", interrupted)
    calls.clear()
    assert main([*args, "--force"]) == 130
    monkeypatch.setattr(sensitivity, "_solve_draw", solve)
    state = out / SENSITIVITY_STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "sensitivity.json").read_text())
    assert [b["eigenvalues"] for b in again["blocks"]] == [b["eigenvalues"] for b in whole["blocks"]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--blocks", "encoder.9"], "block 'encoder.9' does not exist; this model has encoder.0..encoder.1"),
        (["--text-columns", "text"], "column(s) text not in"),
        (["--draws", "0"], "draws must be a positive number"),
        (["--batch-size", "500"], "a draw needs 500 training examples"),
        (["--length-buckets", "0"], "--length-buckets must be a positive number"),
    ],
    ids=["unknown-block", "missing-column", "bad-draws", "too-little-data", "bad-length-buckets"],
)
def test_sensitivity_cli_bad_input(tiny_checkpoint, tiny_data, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    rc = main(
        ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS, "--out", str(out), *extra]
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_bad_model_and_data(tiny_data, tmp_path, capsys):
    import transformers as tf

    tf.GPT2Config(n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    cases = [
        (["--model", str(tmp_path / "nope"), "--data", str(tiny_data)], "does not exist"),
        (["--model", str(tmp_path / "gpt2"), "--data", str(tiny_data)], "'gpt2' is not supported"),
        (["--model", str(tmp_path / "gpt2"), "--data", str(tmp_path / "nodata")], "data folder"),
    ]
    for extra, message in cases:
        rc = main(["sensitivity", *SENS, "--out", str(tmp_path / "o"), *extra])
        assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_non_finite_loss_exits_2(tiny_checkpoint, tiny_data, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights["classifier.weight"] = torch.full_like(weights["classifier.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    rc = main(["sensitivity", "--model", str(broken), "--data", str(tiny_data), *SENS, "--out", str(tmp_path / "o")])
    assert rc == 2 and "loss is not finite" in capsys.readouterr().err


def test_usage_error_exits_2():
    proc = run_cli("sensitivity", "--model", "x")
    assert proc.returncode == 2 and "required" in proc.stderr


def test_finetune_cli_on_tiny_model(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "ft"
    args = [
        "finetune",
        "--model",
        str(tiny_checkpoint),
        "--task",
        "sst2",
        "--data",
        str(tiny_data),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schema"] == "qbert_hessian.metrics/1" and metrics["metrics"]["num_examples"] == 24
    assert 0.0 <= metrics["metrics"]["accuracy"] <= 1.0 and metrics["train_examples"] == 96
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "trainer").exists() and not (out / ".saving").exists()
    assert main(args) == 2  # a finished checkpoint is not overwritten silently


def test_cli_import_is_light():
    code = "import sys, qbert_hessian.cli; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("finetune", "sensitivity", "plan", "quantize", "evaluate", "landscape", "density", "run", "demo"):
        assert f"    {cmd} " in proc.stdout
