from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qbert_hessian.errors import QBHError
from qbert_hessian.tasks import load_raw_task, subset, tokenize_task
from qbert_hessian.tasks.qa import (
    best_spans,
    exact_match,
    normalize_answer,
    prepare_features,
    squad_metrics,
    token_f1,
)

CONTEXT = (
    "The Eiffel Tower is a wrought iron lattice tower in Paris, France. It was built in 1889 by the company of "
    "Gustave Eiffel for the World Fair, and it is the most visited monument in the city of Paris."
)
WORDS = (
    "the eiffel tower is a wrought iron lattice in paris , france . it was built 1889 by company of gustave for "
    "world fair and most visited monument city where who what when ?"
).split()


def squad_json(articles: list[list[tuple[str, str, str]]]) -> dict:
    """Official layout: articles of one paragraph each, (id, question, answer) found in CONTEXT."""
    return {
        "version": "1.1",
        "data": [
            {
                "title": f"a{i}",
                "paragraphs": [
                    {
                        "context": CONTEXT,
                        "qas": [
                            {"id": qid, "question": q, "answers": [{"text": a, "answer_start": CONTEXT.index(a)}]}
                            for qid, q, a in qas
                        ],
                    }
                ],
            }
            for i, qas in enumerate(articles)
        ],
    }


QAS = [("q0", "Where is the tower?", "Paris, France"), ("q1", "When was it built?", "1889")]


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    from transformers import BertTokenizerFast

    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(path), do_lower_case=True)


@pytest.fixture
def squad_dir(tmp_path):
    (tmp_path / "train-v1.1.json").write_text(json.dumps(squad_json([QAS, QAS[:1]])))
    dev = squad_json([[(f"d{i}{j}", q, a) for j, (_, q, a) in enumerate(QAS)] for i in range(4)])
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(dev))
    return tmp_path


# ------------------------------------------------------------------------------------------------ metric


def test_normalisation_and_exact_match():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel Tower", "Eiffel Tower") == 1.0
    assert exact_match("an apple.", "Apple") == 1.0
    assert exact_match("Eiffel Towers", "Eiffel Tower") == 0.0


def test_token_f1_on_hand_computed_overlaps():
    # pred {eiffel, tower, in, paris} vs gold {eiffel, tower}: P = 2/4, R = 1 -> F1 = 2/3
    assert token_f1("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    # repeated tokens count once per gold occurrence: P = 2/3, R = 1 -> F1 = 0.8
    assert token_f1("red red car", "red car") == pytest.approx(0.8)
    assert token_f1("Paris", "Eiffel Tower") == 0.0
    assert token_f1("the", "Paris") == 0.0  # only an article: nothing left to match


def test_squad_metrics_take_the_best_gold_then_average():
    scores = squad_metrics(
        ["Denver Broncos", "Eiffel Tower in Paris"],
        [["Broncos", "Denver Broncos"], ["the Eiffel Tower", "Paris"]],
    )
    # example 1: EM 1, F1 1; example 2: EM 0, F1 max(2/3, 2 * (1/4 * 1) / (1/4 + 1) = 0.4) = 2/3
    assert scores == pytest.approx({"exact_match": 0.5, "f1": (1 + 2 / 3) / 2, "num_examples": 2})


# ------------------------------------------------------------------------------------------------ reading


def test_squad_folder_and_local_split(squad_dir):
    raw = load_raw_task("squad", data_dir=squad_dir)
    assert raw.family == "qa" and raw.label_names == ["start", "end"]
    assert raw.train_texts[0] == ["Where is the tower?", "When was it built?", "Where is the tower?"]
    assert raw.dev_labels[1] == {"text": ["1889"], "answer_start": [CONTEXT.index("1889")]}
    assert len(raw.dev_labels) == 8
    local = load_raw_task("squad-local", data_dir=squad_dir)
    # train: 3 train questions + dev articles 0, 1 (4 questions); dev: dev articles 2, 3 (4 questions)
    assert len(local.train_labels) == 7 and len(local.dev_labels) == 4
    assert local.train_texts[1][3:] == [CONTEXT] * 4
    assert len(subset(local, 2).train_labels) == 2


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda d: d.pop("data"), "top level: no 'data' list"),
        (lambda d: d["data"][1].pop("paragraphs"), r"article 1 \(a1\): no 'paragraphs' list"),
        (lambda d: d["data"][0]["paragraphs"][0].pop("qas"), r"article 0 \(a0\): a paragraph without a 'qas' list"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][1]["answers"][0].update(answer_start=3), "question q1: answer"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[]), "question q0: needs .* answer"),
    ],
)
def test_malformed_squad_names_file_place_and_fix(squad_dir, break_it, match):
    data = squad_json([QAS, QAS[:1]])
    break_it(data)
    (squad_dir / "train-v1.1.json").write_text(json.dumps(data))
    with pytest.raises(QBHError, match=f"train-v1.1.json' {match}.*fix the file"):
        load_raw_task("squad", data_dir=squad_dir)


def test_squad_folder_errors(squad_dir):
    (squad_dir / "train-v1.1.json").write_text("{not json")
    with pytest.raises(QBHError, match="is not valid JSON"):
        load_raw_task("squad", data_dir=squad_dir)
    (squad_dir / "train-other.json").write_text("{}")
    with pytest.raises(QBHError, match="2 .*train\\*.json files"):
        load_raw_task("squad", data_dir=squad_dir)
    (squad_dir / "train-other.json").unlink()
    (squad_dir / "dev-v1.1.json").unlink()
    with pytest.raises(QBHError, match="holds no dev\\*.json"):
        load_raw_task("squad", data_dir=squad_dir)
    with pytest.raises(QBHError, match="does not exist"):
        load_raw_task("squad", data_dir=squad_dir / "missing")
    with pytest.raises(QBHError, match="pass --data"):
        load_raw_task("squad-local")


# ----------------------------------------------------------------------------------------------- features


def test_every_window_holding_the_answer_maps_back_to_its_text(wordpiece):
    questions = ["Where is the tower?", "When was it built?", "Who built it?"]
    answers = ["Paris, France", "1889", "the company of Gustave Eiffel"]
    gold = [{"text": [a], "answer_start": [CONTEXT.index(a)]} for a in answers]
    feats = prepare_features(wordpiece, questions, [CONTEXT] * 3, gold, max_length=24, stride=6)
    assert len(feats["input_ids"]) > 6  # the context overflows into several windows per question
    assert all(len(ids) == 24 for ids in feats["input_ids"])
    labelled = outside = 0
    for f, ex in enumerate(feats["example_index"]):
        offs = [o for o in feats["offset_mapping"][f] if o is not None]
        start = gold[ex]["answer_start"][0]
        inside = offs[0][0] <= start and offs[-1][1] >= start + len(answers[ex])
        s, e = feats["start_positions"][f], feats["end_positions"][f]
        if inside:
            labelled += 1
            span = CONTEXT[feats["offset_mapping"][f][s][0] : feats["offset_mapping"][f][e][1]]
            assert span == answers[ex]
        else:
            outside += 1
            assert s == e == 0  # the [CLS] index
    assert labelled >= 3 and outside >= 3
    # offsets are kept for context tokens only: the question and specials carry None
    assert feats["offset_mapping"][0][0] is None and feats["offset_mapping"][0][1] is None


def test_qa_task_features_and_stride(squad_dir, wordpiece):
    raw = load_raw_task("squad", data_dir=squad_dir)
    task = tokenize_task(raw, wordpiece, max_length=32)
    assert task.family == "qa" and task.num_labels == 2
    assert sorted(set(task.dev["example_index"])) == list(range(8))
    batch = task.batch("dev", [0, 1])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    with pytest.raises(QBHError, match="stride 40 must lie in"):
        tokenize_task(raw, wordpiece, max_length=32, stride=40)
    with pytest.raises(QBHError, match="raise --max-length"):
        tokenize_task(raw, wordpiece, max_length=8, stride=2)


# ------------------------------------------------------------------------------------------ post-processing


def test_best_span_over_features_respects_length_and_context():
    context = "abcdefghij"
    # two features of example 0; each context token covers one character; None marks question/special tokens
    offsets = [
        [None, None, (0, 1), (1, 2), (2, 3), (3, 4), (4, 5), None],
        [None, None, (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), None],
    ]
    start = np.full((2, 9), -50.0)  # one column wider than the features: batch padding, must be ignored
    end = np.full((2, 9), -50.0)
    start[:, 8] = end[:, 8] = 100.0
    start[0, 0] = end[0, 0] = 50.0  # the best raw score sits on [CLS], outside the context
    start[0, 2], end[0, 6] = 9.0, 8.0  # "abcde": score 17 but 5 tokens long
    start[1, 4], end[1, 5] = 5.0, 4.0  # 'gh' in the second window: score 9
    end[1, 3] = 20.0  # ends before start 4: invalid with it, and -30 with the starts before it
    assert best_spans(start, end, [0, 0], offsets, [context], max_answer_length=3) == ["gh"]
    assert best_spans(start, end, [0, 0], offsets, [context], max_answer_length=6) == ["abcde"]
    # with n_best = 1 only (CLS, CLS) and (start 4, end 3) are tried: no valid span, an empty answer
    assert best_spans(start, end, [0, 0], offsets, [context], n_best=1) == [""]
    # features of two examples are kept apart; alone, window 0 offers "abc" (9 - 50) over "cde" (-50 + 8)
    assert best_spans(start, end, [0, 1], offsets, [context, "ABCDEFGHIJ"], max_answer_length=3) == ["abc", "GH"]


def test_evaluate_qa_reports_squad_scores_and_feature_loss(squad_dir, wordpiece):
    from transformers import BertConfig, BertForQuestionAnswering

    from qbert_hessian.evaluate import evaluate

    task = tokenize_task(load_raw_task("squad", data_dir=squad_dir), wordpiece, max_length=32)
    cfg = BertConfig(
        vocab_size=len(wordpiece), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        max_position_embeddings=64, num_labels=2, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForQuestionAnswering(cfg).eval()
    metrics = evaluate(model, task, batch_size=3)
    with torch.no_grad():
        whole = float(model(**task.batch("dev", range(len(task.dev)))).loss)
    assert metrics["loss"] == pytest.approx(whole, rel=1e-5)  # a mean over features
    assert metrics["num_examples"] == 8 and 0 <= metrics["exact_match"] <= metrics["f1"] <= 1


def test_trainer_metrics_equal_evaluate(squad_dir, wordpiece, tmp_path):
    from transformers import BertConfig, BertForQuestionAnswering

    from qbert_hessian.evaluate import evaluate
    from tests.unit.test_token_task import trainer_eval

    task = tokenize_task(load_raw_task("squad", data_dir=squad_dir), wordpiece, max_length=32)
    cfg = BertConfig(
        vocab_size=len(wordpiece), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        max_position_embeddings=64, num_labels=2, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(3)
    model = BertForQuestionAnswering(cfg).eval()
    with torch.no_grad():  # a head that prefers some spans, so EM/F1 are not all zero by chance alone
        model.qa_outputs.weight.normal_(0, 1.0)
    got, setup = trainer_eval(model, task, tmp_path / "trainer")
    want = evaluate(model, task)
    assert setup.metric == "f1" and 0 < want["f1"] < 1
    assert got["eval_f1"] == pytest.approx(want["f1"]) and got["eval_exact_match"] == pytest.approx(want["exact_match"])
    assert got["eval_loss"] == pytest.approx(want["loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------- squad-full


@pytest.fixture
def squad_full_dir(tmp_path):
    """Like shared/data/squad-full: a reconstructed train file (synthetic ids) beside an official-style dev file."""
    d = tmp_path / "squad-full"
    d.mkdir()
    train = [[(f"recon-{a:03d}-000-{q:02d}", f"train question {a} {q}?", "Paris") for q in range(3)] for a in range(5)]
    dev = [[(f"5733be28477{a}{q}", f"dev question {a} {q}?", "1889") for q in range(2)] for a in range(3)]
    (d / "train-v1.1-reconstructed.json").write_text(json.dumps(squad_json(train)))
    (d / "dev-v1.1.json").write_text(json.dumps(squad_json(dev)))
    return d


def test_squad_full_trains_on_the_train_file_and_scores_the_dev_file(squad_full_dir):
    raw = load_raw_task("squad-full", data_dir=squad_full_dir)
    assert raw.name == "squad-full" and raw.family == "qa"
    assert raw.train_texts[0] == [f"train question {a} {q}?" for a in range(5) for q in range(3)]
    assert raw.dev_texts[0] == [f"dev question {a} {q}?" for a in range(3) for q in range(2)]
    assert all(a["text"] == ["Paris"] for a in raw.train_labels) and all(a["text"] == ["1889"] for a in raw.dev_labels)


def test_squad_full_subset_is_seeded_and_from_the_train_file_only(squad_full_dir):
    raw = load_raw_task("squad-full", data_dir=squad_full_dir)
    a, b, c = subset(raw, 6, seed=0), subset(raw, 6, seed=0), subset(raw, 6, seed=1)
    assert a == b and a.train_texts != c.train_texts and len(a.train_labels) == 6
    assert set(a.train_texts[0]) <= set(raw.train_texts[0])
    assert (a.dev_texts, a.dev_labels) == (raw.dev_texts, raw.dev_labels)


def test_a_reconstructed_file_is_never_scored(squad_full_dir):
    """Reconstructed ids are fine to train on, refused in the dev file whatever the local task."""
    (squad_full_dir / "dev-v1.1.json").unlink()
    (squad_full_dir / "train-v1.1-reconstructed.json").rename(squad_full_dir / "dev-v1.1.json")
    (squad_full_dir / "train-v1.1.json").write_text(json.dumps(squad_json([QAS])))
    for task in ("squad-full", "squad", "squad-local"):
        with pytest.raises(QBHError, match="question recon-000-000-00 has a reconstructed id: a dev file is scored"):
            load_raw_task(task, data_dir=squad_full_dir)


def test_squad_full_reads_local_files_only():
    with pytest.raises(QBHError, match="task 'squad-full' reads local files; pass --data DIR"):
        load_raw_task("squad-full")


def test_tokenizing_in_chunks_gives_the_same_features(squad_full_dir, wordpiece):
    """The features of a split, made a few examples at a time, equal those made at once (example ids included)."""
    raw = load_raw_task("squad-full", data_dir=squad_full_dir)
    whole = tokenize_task(raw, wordpiece, max_length=24, stride=8)
    for chunk in (1, 4, 7):
        parts = tokenize_task(raw, wordpiece, max_length=24, stride=8, chunk=chunk)
        assert parts.train.to_dict() == whole.train.to_dict() and parts.dev.to_dict() == whole.dev.to_dict()
    assert len(whole.train) > len(raw.train_labels)  # several windows per context: example ids carry across chunks
    with pytest.raises(QBHError, match="chunk 0 must be at least 1"):
        tokenize_task(raw, wordpiece, max_length=24, chunk=0)
