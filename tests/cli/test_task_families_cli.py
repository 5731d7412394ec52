"""NER and QA through the commands: fine-tune, evaluate and sensitivity on the tiny model; bad files exit 2."""

from __future__ import annotations

import json

import pytest

from qbert_hessian.cli import main
from tests.helpers import squad_file, write_mnli_dir, write_ner_dir, write_squad_dir


@pytest.fixture
def ner_dir(tmp_path):
    return write_ner_dir(tmp_path / "ner")


@pytest.fixture
def squad_dir(tmp_path):
    return write_squad_dir(tmp_path / "squad")


COMMON = ["--max-length", "32", "--quiet"]


@pytest.mark.parametrize(
    ("task", "data", "columns"),
    [("conll03", "ner_dir", ["f1", "precision", "recall", "accuracy"]), ("squad", "squad_dir", ["exact_match", "f1"])],
)
def test_finetune_evaluate_sensitivity(tiny_checkpoint, tmp_path, request, capsys, task, data, columns):
    data_dir = str(request.getfixturevalue(data))
    ckpt = tmp_path / "ckpt"
    ft = ["finetune", "--model", str(tiny_checkpoint), "--task", task, "--data", data_dir, "--epochs", "1"]
    assert main([*ft, "--batch-size", "8", "--out", str(ckpt), *COMMON]) == 0
    metrics = json.loads((ckpt / "metrics.json").read_text())["metrics"]
    assert set(columns) <= set(metrics) and "macro_f1" not in metrics
    assert json.loads((ckpt / "config.json").read_text())["architectures"][0].endswith(
        "ForTokenClassification" if task == "conll03" else "ForQuestionAnswering"
    )
    assert f"dev {columns[0]} " in capsys.readouterr().out

    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(ckpt), "--task", task, "--data", data_dir, "--out", str(out), *COMMON]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["kind"] == "fp32" and row[columns[0]] == pytest.approx(metrics[columns[0]], abs=1e-6)
    assert f"| {' | '.join(columns)} | loss |" in capsys.readouterr().out

    sens = tmp_path / "sens"
    args = ["sensitivity", "--model", str(ckpt), "--task", task, "--data", data_dir, "--blocks", "encoder.0"]
    assert main([*args, "--draws", "1", "--batch-size", "4", "--max-iters", "5", "--out", str(sens), *COMMON]) == 0
    report = json.loads((sens / "sensitivity.json").read_text())
    assert report["complete"] and report["blocks"][0]["eigenvalues"][0] != 0


def _bad_conll_columns(d):
    (d / "valid.txt").write_text("good NN O B-POS\nmovie NN O\n")


def _bad_conll_tag(d):
    (d / "valid.txt").write_text("good NN O B-MOVIE\n")


def _no_valid(d):
    (d / "valid.txt").unlink()


def _squad_without_data(d):
    (d / "dev-v1.1.json").write_text(json.dumps({"version": "1.1"}))


def _squad_bad_start(d):
    data = squad_file(4, 1)
    data["data"][2]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] += 1
    (d / "dev-v1.1.json").write_text(json.dumps(data))


def _squad_no_qas(d):
    data = squad_file(4, 1)
    del data["data"][0]["paragraphs"][0]["qas"]
    (d / "train-v1.1.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("task", "data", "break_it", "message"),
    [
        ("conll03", "ner_dir", _bad_conll_columns, "valid.txt' line 2: expected 4 space-separated columns"),
        ("conll03", "ner_dir", _bad_conll_tag, "dev tags ['B-MOVIE']"),
        ("conll03", "ner_dir", _no_valid, "no valid file"),
        ("squad", "squad_dir", _squad_without_data, "dev-v1.1.json' top level: no 'data' list"),
        ("squad", "squad_dir", _squad_bad_start, "question 2-1: answer_start"),
        ("squad", "squad_dir", _squad_no_qas, "without a 'qas' list"),
    ],
    ids=["conll-columns", "conll-unseen-tag", "conll-no-dev", "squad-no-data", "squad-answer-start", "squad-no-qas"],
)
@pytest.mark.parametrize("command", ["finetune", "sensitivity"])
def test_bad_task_files_exit_2_with_one_line(
    tiny_checkpoint, tmp_path, request, capsys, task, data, break_it, message, command
):
    data_dir = request.getfixturevalue(data)
    break_it(data_dir)
    out = tmp_path / "out"
    rc = main(
        [command, "--model", str(tiny_checkpoint), "--task", task, "--data", str(data_dir), "--out", str(out), *COMMON]
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_mnli_local_and_squad_full_train_on_a_recorded_seeded_subset(tiny_checkpoint, tmp_path, capsys):
    """The two local-protocol tasks through finetune: the subset's size and seed are in metrics.json, and an
    mnli-local model is refused on mnli-local-mm's dev split (its own training data)."""
    mnli = write_mnli_dir(tmp_path / "mnli")
    squad = write_squad_dir(tmp_path / "squad-full", train=8, dev=3)
    for task, data, n in (("mnli-local", mnli, 20), ("squad-full", squad, 10)):
        ckpt = tmp_path / task
        argv = ["finetune", "--model", str(tiny_checkpoint), "--task", task, "--data", str(data), "--epochs", "1"]
        assert main([*argv, "--max-train-samples", str(n), "--seed", "3", "--out", str(ckpt), *COMMON]) == 0
        record = json.loads((ckpt / "metrics.json").read_text())
        assert record["task"] == task
        assert (record["config"]["max_train_samples"], record["config"]["seed"]) == (n, 3)
    assert json.loads((tmp_path / "mnli-local" / "metrics.json").read_text())["train_examples"] == 20
    capsys.readouterr()
    evaluate = ["evaluate", "--model", str(tmp_path / "mnli-local"), "--data", str(mnli), *COMMON]
    assert main([*evaluate, "--task", "mnli-local", "--out", str(tmp_path / "e1")]) == 0
    assert main([*evaluate, "--task", "mnli-local-mm", "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert "fine-tuned on task 'mnli-local', whose training split" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e2").exists()
