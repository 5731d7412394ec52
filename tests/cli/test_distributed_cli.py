"""Two gloo processes under torchrun give what one process gives, and a misconfigured world fails at once.

One torchrun launch (tests/distributed_worker.py) runs, on 2 ranks of one process group: sensitivity in data-
and block-parallel mode, a landscape row, and a run whose plan gets QAT and a packed export. The same commands
run here in one process. What is compared, and how closely:

- eigenvalues and traces: 1e-6 relative. Block-parallel ranks compute whole blocks exactly as one process does;
  data-parallel products add the same per-batch terms in another order (each rank sums its own batches, then
  one all-reduce), which only float rounding can tell apart;
- the landscape row: 1e-6 relative (every point is one process's computation on the same directions);
- QAT and its packed file: to float tolerance, not bit for bit. DDP averages the gradients of the two halves of
  each batch, one process takes the gradient of the whole batch: the same sum in another order (1e-5). Two
  exceptions, both stated where they are checked: the attention key biases, whose gradient is zero in exact
  arithmetic (softmax ignores a shift), so Adam's normalised step turns rounding noise into small moves that
  cannot change an output (the logits are compared instead); and the activation ranges (1e-3), which include
  padded positions, as in one process, while each rank pads its half of a batch to its own longest row only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qbert_hessian.cli import main

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SENS = [
    "--task",
    "sst2",
    "--draws",
    "2",
    "--batch-size",
    "8",
    "--max-iters",
    "20",
    "--tol",
    "1e-6",
    "--max-length",
    "16",
    "--trace-samples",
    "2",
    "--quiet",
]
RUN = """
[model]
name = "{model}"
task = "sst2"
data = "{data}"
max_length = 16

[sensitivity]
draws = 1
batch_size = 8
batches_per_draw = 2
max_iters = 10
trace = "none"

[allocate]
groups = "channel"
rounding = "nearest"  # what these tests compared across ranks before GPTQ became the default
act_range = "max"     # static ranges, averaged over the ranks (dynamic ones, the default, have none to compare)

[qat]
epochs = 1
batch_size = 16
lr = 1e-3
distill = true

[run]
calibration_batches = 2
batch_size = 8
frontier = false

[[plans]]
name = "uniform-4"
uniform = 4
"""
# a run from a bare encoder: fine-tuning under DDP first (its head starts from each process's own random draw,
# which DDP replaces by rank 0's, so it is checked for completing, not against one process)
FROM_BASE = """
[model]
name = "{model}"
task = "sst2"
data = "{data}"
max_length = 16

[finetune]
epochs = 1
batch_size = 16

[sensitivity]
draws = 1
batch_size = 8
batches_per_draw = 2
max_iters = 5
trace = "none"

[allocate]
groups = "channel"
rounding = "nearest"  # what these tests compared across ranks before GPTQ became the default
act_range = "max"     # static ranges, averaged over the ranks (dynamic ones, the default, have none to compare)

[run]
qat = false
calibration_batches = 1
batch_size = 8
frontier = false

[[plans]]
name = "uniform-8"
uniform = 8
"""
# the worker's library checks: a draw of 4 batches (2 per rank), and the protocol of the data-parallel report
HVP_BATCHES = [list(range(i, i + 8)) for i in range(0, 32, 8)]
SENSITIVITY = {"draws": 2, "batch_size": 8, "batches_per_draw": 4, "max_iters": 20, "tol": 1e-6, "trace": "none"}


def commands(root: Path, model: Path, data: Path) -> dict[str, list[str]]:
    files = ["--model", str(model), "--data", str(data)]
    (root / "run.toml").write_text(RUN.format(model=model, data=data))
    return {
        "data": ["sensitivity", *files, *SENS, "--batches-per-draw", "2", "--parallel", "data", "--out", f"{root}/d"],
        "blocks": ["sensitivity", *files, *SENS, "--parallel", "blocks", "--out", f"{root}/b"],
        "landscape": [
            "landscape",
            *files,
            "--task",
            "sst2",
            "--block",
            "encoder.1",
            "--dims",
            "1",
            "--grid",
            "5",
            "--batches",
            "2",
            "--batch-size",
            "8",
            "--max-length",
            "16",
            "--quiet",
            "--out",
            f"{root}/l",
        ],
        "run": ["run", str(root / "run.toml"), "--out", f"{root}/r", "--quiet"],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one(tiny_checkpoint, tiny_data, tmp_path_factory):
    """The commands in this process."""
    root = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (and the autouse fixture comes after module fixtures)
    try:
        codes = {name: main(argv) for name, argv in commands(root, tiny_checkpoint, tiny_data).items()}
    finally:
        torch.set_num_threads(threads)
    assert codes == {"data": 0, "blocks": 0, "landscape": 0, "run": 0}
    return root


@pytest.fixture(scope="module")
def two(tiny_checkpoint, tiny_data, tmp_path_factory):
    """The commands on 2 gloo ranks under torchrun."""
    root = tmp_path_factory.mktemp("two")
    base = root / "base"
    shutil.copytree(tiny_checkpoint, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    (root / "from_base.toml").write_text(FROM_BASE.format(model=base, data=tiny_data))
    from_base = ["run", str(root / "from_base.toml"), "--out", f"{root}/f", "--quiet"]
    spec = {
        "commands": {**commands(root, tiny_checkpoint, tiny_data), "from-base": from_base},
        "model": str(tiny_checkpoint),
        "data": str(tiny_data),
        "hvp_batches": HVP_BATCHES,
        "sensitivity": SENSITIVITY,
    }
    (root / "plan.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launch = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    proc = subprocess.run(
        [*launch, str(ROOT / "tests" / "distributed_worker.py"), str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [[0, 2], [1, 2]]
    expected = {"data": 0, "blocks": 0, "landscape": 0, "run": 0, "from-base": 0}
    assert all(r["codes"] == expected for r in ranks), ranks
    return root, ranks, proc


def _blocks(path: Path) -> dict:
    return {b["name"]: b for b in json.loads(path.read_text())["blocks"]}


@pytest.mark.parametrize("mode", ["d", "b"], ids=["data", "blocks"])
def test_sensitivity_on_two_ranks_equals_one_process(one, two, mode):
    a, b = (json.loads((r / mode / "sensitivity.json").read_text()) for r in (one, two[0]))
    assert b["complete"] and b["config"] == a["config"] and b["draws"] == a["draws"]
    assert "parallel" not in b["config"]  # how ranks share the work is not a setting of the numbers
    blocks_a, blocks_b = _blocks(one / mode / "sensitivity.json"), _blocks(two[0] / mode / "sensitivity.json")
    assert list(blocks_b) == ["embeddings", "encoder.0", "encoder.1"]
    for name, x in blocks_a.items():
        y = blocks_b[name]
        assert y["eigenvalues"] == pytest.approx(x["eigenvalues"], rel=1e-6), name
        assert y["trace"]["mean"] == pytest.approx(x["trace"]["mean"], rel=1e-6), name
        assert y["iterations"] == x["iterations"], name
    assert (two[0] / mode / "profile.json").is_file()  # rank 0 finished the stage


def test_every_rank_holds_the_same_operator_as_one_process(two, tiny_checkpoint, tiny_data):
    """The data-parallel product: rows of the word table are the union over ranks, the loss and the product the
    ones of the whole draw, identical on both ranks."""
    from qbert_hessian.config import SensitivityConfig
    from qbert_hessian.hessian import vec
    from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled
    from qbert_hessian.models import BlockMap, load_model
    from qbert_hessian.sensitivity import estimate_sensitivity
    from qbert_hessian.tasks import load_task

    _, ranks, _ = two
    assert ranks[0]["rows"] == ranks[1]["rows"] and ranks[0]["hv"] == ranks[1]["hv"]
    assert ranks[0]["loss"] == ranks[1]["loss"] and ranks[0]["eigenvalues"] == ranks[1]["eigenvalues"]
    model, tokenizer = load_model(str(tiny_checkpoint), num_labels=2)
    task = load_task("sst2", tokenizer, data_dir=tiny_data, max_length=16)
    params = BlockMap(model).parameters("embeddings")
    with curvature_mode(model), grads_enabled(params):
        hvp = BlockHessian(model, params, [task.batch("train", idx) for idx in HVP_BATCHES])
        hv = hvp(vec.randn_like(hvp.like, torch.Generator().manual_seed(5)))
    assert ranks[0]["rows"] == [None if r is None else r.tolist() for r in hvp.rows]
    assert any(r is not None for r in ranks[0]["rows"])  # the word table was cut to the draw's rows
    assert ranks[0]["loss"] == pytest.approx(hvp.loss, rel=1e-6)
    np.testing.assert_allclose(ranks[0]["hv"], vec.flatten(hv).numpy(), rtol=1e-5, atol=1e-7)
    report = estimate_sensitivity(model, task, SensitivityConfig(**SENSITIVITY), progress=False)
    for b in report.blocks:
        assert ranks[1]["eigenvalues"][b.name] == pytest.approx(b.eigenvalues, rel=1e-6), b.name


def test_landscape_row_on_two_ranks_equals_one_process(one, two):
    a, b = (json.loads((r / "l" / "encoder.1" / "landscape.json").read_text()) for r in (one, two[0]))
    assert len(b["loss"]) == 1 and len(b["loss"][0]) == 5 and all(x is not None for x in b["loss"][0])
    assert b["loss"][0] == pytest.approx(a["loss"][0], rel=1e-6)
    assert b["directions"]["eigenvalues"] == pytest.approx(a["directions"]["eigenvalues"], rel=1e-6)


def test_qat_and_packed_export_on_two_ranks_equal_one_process(one, two, tiny_data):
    from safetensors.torch import load_file

    from qbert_hessian.evaluate import evaluate
    from qbert_hessian.export import load_packed
    from qbert_hessian.models import load_tokenizer
    from qbert_hessian.tasks import load_task

    packed = [r / "r" / "results" / "uniform-4" / "packed" for r in (one, two[0])]
    qat = [json.loads((p.parent / "qat.json").read_text()) for p in packed]
    assert qat[1]["steps"] == qat[0]["steps"] == 6 and qat[1]["examples_seen"] == qat[0]["examples_seen"] == 96
    a, b = (load_file(p / "model.safetensors") for p in packed)
    assert a.keys() == b.keys()
    for key in a:
        if ".attention.self.key.bias" in key:
            continue  # no gradient in exact arithmetic: see the module docstring
        if a[key].dtype == torch.uint8:  # packed codes: equal, but a rounding tie may tip one code
            assert (a[key] != b[key]).float().mean() < 1e-3, key
        elif key.endswith(".amax"):  # padded positions: see the module docstring
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=0, msg=key)
        else:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    models = [load_packed(p) for p in packed]
    task = load_task("sst2", load_tokenizer(str(packed[0])), data_dir=tiny_data, max_length=16)
    batch = task.batch("dev", range(24))
    with torch.no_grad():
        logits = [m(**batch).logits for m in models]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    metrics = [json.loads((p.parent / "metrics.json").read_text())["metrics"] for p in packed]
    assert metrics[1]["accuracy"] == metrics[0]["accuracy"]
    assert metrics[1]["loss"] == pytest.approx(metrics[0]["loss"], rel=1e-4)
    assert evaluate(models[1], task)["accuracy"] == metrics[1]["accuracy"]


def test_only_rank_zero_writes_and_prints(two):
    root, _, proc = two
    assert proc.stdout.count("report in ") == 2  # the two sensitivity commands, once each
    assert not list(root.rglob("*.tmp"))
    assert (root / "r" / "report.md").is_file()


# ------------------------------------------------------------------------------------ misconfigured worlds


def torchrun_env(monkeypatch, rank: int = 0, size: int = 2) -> None:
    """The variables torchrun sets for one of ``size`` processes; joining the group would fail the test, since
    every bad input must be refused before the rendezvous (which would wait for the other ranks)."""

    def no_rendezvous(*_args, **_kwargs):
        raise AssertionError("joined the process group before the inputs were checked")

    for key, value in {
        "RANK": rank,
        "LOCAL_RANK": rank,
        "WORLD_SIZE": size,
        "LOCAL_WORLD_SIZE": size,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": free_port(),
    }.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr("qbert_hessian.distributed.start", no_rendezvous)


def refused(capsys, argv: list[str], out: Path, message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qbert-hessian {argv[0]}: error: "), err
    assert message in err[0], err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"WORLD_SIZE": "2"},
            "WORLD_SIZE=2 is set but RANK, MASTER_ADDR and MASTER_PORT are not; launch with torchrun",
        ),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29500"}, "WORLD_SIZE=2 is set but MASTER_ADDR is not"),
        (
            {"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
            "RANK=2 lies outside WORLD_SIZE=2 (ranks are 0..1)",
        ),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ],
    ids=["no-rank", "no-master-addr", "rank-outside", "not-a-number"],
)
def test_a_misconfigured_environment_fails_in_one_line(
    tiny_checkpoint, tiny_data, tmp_path, capsys, monkeypatch, env, message
):
    for key in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    argv = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS, "--out", str(out)]
    refused(capsys, argv, out, message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--parallel", "data"],
            "--parallel data gives every rank a share of each draw's batches, but a draw has 1 batch(es) for 2 ranks; "
            "raise --batches-per-draw to 2",
        ),
        (
            ["--draw-fraction", "0.05"],  # 5 of the 96 examples: one batch
            "--parallel blocks gives every rank whole blocks, but 1 block(s) are left for 2 ranks",
        ),
        (["--parallel", "blocks", "--blocks", "encoder.0"], "1 block(s) are left for 2 ranks; use --parallel data"),
        (["--device", "cuda"], "2 processes on this host need a GPU each but 0 are visible"),
    ],
    ids=["data-one-batch", "auto-nothing-to-share", "blocks-one-block", "no-gpu"],
)
def test_sensitivity_refuses_work_the_world_cannot_share(
    tiny_checkpoint, tiny_data, tmp_path, capsys, monkeypatch, extra, message
):
    torchrun_env(monkeypatch)
    extra = [*extra, "--blocks", "encoder.1"] if "--draw-fraction" in extra else extra
    out = tmp_path / "out"
    argv = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS, *extra, "--out", str(out)]
    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("this machine has GPUs")
    refused(capsys, argv, out, message)


def test_an_unavailable_backend_is_refused(tiny_checkpoint, tiny_data, tmp_path, capsys, monkeypatch):
    torchrun_env(monkeypatch)
    monkeypatch.setattr("torch.distributed.is_gloo_available", lambda: False)
    out = tmp_path / "out"
    argv = ["landscape", "--model", str(tiny_checkpoint), "--data", str(tiny_data), "--task", "sst2"]
    refused(capsys, [*argv, "--block", "encoder.0", "--out", str(out)], out, "the gloo backend is not available")


def test_light_commands_and_unsplittable_batches_are_refused(tiny_checkpoint, tiny_data, tmp_path, capsys, monkeypatch):
    torchrun_env(monkeypatch)
    out = tmp_path / "plan.json"
    refused(capsys, ["plan", "--report", str(tmp_path), "--uniform", "4", "--out", str(out)], out, "plan runs in one")
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN.format(model=tiny_checkpoint, data=tiny_data).replace("batch_size = 16", "batch_size = 15"))
    out = tmp_path / "run"
    refused(capsys, ["run", str(cfg), "--out", str(out)], out, "[qat] batch_size 15 is the batch of all 2 processes")
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(tiny_checkpoint), "--task", "sst2", "--data", str(tiny_data)]
    refused(capsys, [*argv, "--batch-size", "15", "--out", str(out)], out, "--batch-size 15 is the batch of all 2")


def test_only_the_first_process_of_a_host_prints_the_error(tiny_checkpoint, tiny_data, tmp_path, capsys, monkeypatch):
    torchrun_env(monkeypatch, rank=1)
    out = tmp_path / "out"
    argv = ["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_data), *SENS, "--parallel", "data"]
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err == "" and not out.exists()


def test_a_run_that_fine_tunes_first_completes_on_two_ranks(two):
    """Fine-tuning under DDP, then every stage: the stages every rank takes part in meet in the same order."""
    root = two[0] / "f"
    metrics = json.loads((root / "checkpoint" / "metrics.json").read_text())
    assert metrics["train_examples"] == 96 and metrics["config"]["batch_size"] == 16
    assert (root / "sensitivity" / "sensitivity.json").is_file() and (root / "report.md").is_file()
    result = json.loads((root / "results" / "uniform-8" / "metrics.json").read_text())
    assert result["stage"] == "direct" and result["metrics"]["num_examples"] == 24
    assert not (root / "checkpoint" / "trainer").exists()  # rank 0 removed the Trainer's checkpoints


def test_a_run_whose_sensitivity_cannot_be_shared_is_refused_before_any_stage(
    tiny_checkpoint, tiny_data, tmp_path, capsys, monkeypatch
):
    """4 processes, 2 batches per draw and the tiny model's 3 blocks: neither mode gives every process work."""
    torchrun_env(monkeypatch, size=4)
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN.format(model=tiny_checkpoint, data=tiny_data))
    out = tmp_path / "run"
    message = "share the run's 3 blocks (the embeddings and 2 layers), fewer than the processes"
    refused(capsys, ["run", str(cfg), "--out", str(out)], out, message)
    data_mode = ["run", str(cfg), "--set", 'sensitivity.parallel="data"', "--out", str(out)]
    refused(capsys, data_mode, out, '[sensitivity] parallel = "data" gives every process a share')
