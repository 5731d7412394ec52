from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qbert_hessian.errors import QBHError
from qbert_hessian.tasks import load_raw_task, subset, task_scores, tokenize_task
from qbert_hessian.tasks.token import entity_scores, label_positions, read_conll

CONLL_TRAIN = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O


-DOCSTART- -X- -X- O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP B-NP B-LOC
"""
CONLL_DEV = """-DOCSTART- -X- -X- O

German JJ B-NP B-MISC
lamb NN I-NP O
"""
VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] eu rej ##ects german call to boycott lamb . peter black ##burn brussels"


@pytest.fixture
def conll_dir(tmp_path):
    (tmp_path / "train.txt").write_text(CONLL_TRAIN, encoding="utf-8")
    (tmp_path / "valid.txt").write_text(CONLL_DEV, encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    from transformers import BertTokenizerFast

    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB.split()) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(path), do_lower_case=True)


def test_conll_reader_skips_docstart_and_splits_on_blank_lines(conll_dir):
    words, tags = read_conll(conll_dir / "train.txt")
    assert words == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert tags == [["B-ORG", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER"], ["B-LOC"]]


def test_conll_task_tags_come_sorted_from_train(conll_dir):
    raw = load_raw_task("conll03", data_dir=conll_dir)
    assert raw.family == "token"
    assert raw.label_names == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER", "O"]
    assert raw.train_texts[0][1] == ["Peter", "Blackburn"] and raw.train_labels[1] == [3, 4]
    assert raw.dev_labels == [[1, 5]]
    sub = subset(raw, 2, seed=0)  # sentences keep their own tags
    pairs = list(zip(raw.train_texts[0], raw.train_labels))
    assert len(sub.train_labels) == 2 and all(p in pairs for p in zip(sub.train_texts[0], sub.train_labels))


def test_conll_errors_name_file_line_and_fix(conll_dir):
    (conll_dir / "valid.txt").write_text("German JJ B-NP B-MISC\nlamb NN O\n", encoding="utf-8")
    with pytest.raises(QBHError, match=r"valid.txt' line 2: expected 4 .*found 3; fix the line"):
        load_raw_task("conll03", data_dir=conll_dir)
    (conll_dir / "valid.txt").write_text("Paris NNP B-NP B-CITY\n", encoding="utf-8")
    with pytest.raises(QBHError, match=r"dev tags \['B-CITY'\] in .*valid.txt"):
        load_raw_task("conll03", data_dir=conll_dir)
    (conll_dir / "valid.txt").unlink()
    with pytest.raises(QBHError, match="no valid file .*valid.txt, dev.txt"):
        load_raw_task("conll03", data_dir=conll_dir)
    with pytest.raises(QBHError, match="does not exist"):
        load_raw_task("conll03", data_dir=conll_dir / "missing")
    (conll_dir / "dev.txt").write_text("\n-DOCSTART- -X- -X- O\n\n", encoding="utf-8")
    with pytest.raises(QBHError, match="holds no sentences"):
        load_raw_task("conll03", data_dir=conll_dir)
    with pytest.raises(QBHError, match="--text-columns"):
        load_raw_task("conll03", data_dir=conll_dir, text_columns=["x"])


def test_jsonl_token_folder(tmp_path):
    rows = [{"tokens": ["a", "b"], "tags": ["B-X", "O"]}, {"tokens": ["c"], "tags": ["O"]}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "dev.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"tokens": ["a"], "tags": []}))
    with pytest.raises(QBHError, match=r"dev.jsonl' line 2: expected .*one tag per token"):
        load_raw_task("ner", data_dir=tmp_path)
    (tmp_path / "dev.jsonl").write_text(json.dumps(rows[0]))
    raw = load_raw_task("ner", data_dir=tmp_path)
    assert raw.label_names == ["B-X", "O"] and raw.train_labels == [[0, 1], [1]]
    with pytest.raises(QBHError, match="pass --data"):
        load_raw_task("ner")


def test_first_subtoken_carries_the_tag(wordpiece):
    enc = wordpiece(["EU", "rejects", "Blackburn", "."], is_split_into_words=True)
    assert wordpiece.convert_ids_to_tokens(enc["input_ids"]) == [
        "[CLS]", "eu", "rej", "##ects", "black", "##burn", ".", "[SEP]",
    ]  # fmt: skip
    assert label_positions([enc.word_ids()], [(0, 0)]) == [[-1, 0, 1, -1, 2, -1, 3, -1]]


def test_tokenized_batches_pad_labels_with_ignore_index(conll_dir, wordpiece):
    task = tokenize_task(load_raw_task("conll03", data_dir=conll_dir), wordpiece, max_length=5)
    assert task.family == "token" and task.num_labels == 6
    batch = task.batch("train", [0, 2])
    # sentence 0 is cut to [CLS] eu rej ##ects [SEP]; sentence 2 is [CLS] brussels [SEP], padded
    assert batch["labels"].tolist() == [[-100, 2, 5, -100, -100], [-100, 0, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_seqeval_scores_on_hand_cases():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O"]]
    # one of two gold entities found, no false positive: P = 1, R = 1/2, F1 = 2/3; 4 of 5 tokens right
    s = entity_scores(gold, [["B-PER", "I-PER", "O", "O", "O"]])
    assert s == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "accuracy": 0.8})
    # a split entity is wrong as a whole: predicted PER, PER (two) vs gold PER (one)
    s = entity_scores([["B-PER", "I-PER"]], [["B-PER", "B-PER"]])
    assert s["precision"] == 0.0 and s["recall"] == 0.0 and s["accuracy"] == 0.5
    # wrong type: LOC predicted as ORG
    s = entity_scores(gold, [["B-PER", "I-PER", "O", "B-ORG", "O"]])
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5)


def test_token_scores_skip_ignored_and_padded_positions(conll_dir, wordpiece):
    dev = "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\nBRUSSELS NNP B-NP B-LOC\n"
    (conll_dir / "valid.txt").write_text(dev, encoding="utf-8")
    task = tokenize_task(load_raw_task("conll03", data_dir=conll_dir), wordpiece)
    names = task.label_names  # B-LOC B-MISC B-ORG B-PER I-PER O
    # rows: [CLS] peter black ##burn [SEP] and [CLS] brussels [SEP]; only first sub-tokens are labelled
    assert task.dev["word_index"] == [[-1, 0, 1, -1, -1], [-1, 0, -1]]
    logits = np.full((2, 5, 6), -100.0)
    for row, col, tag in [(0, 1, 3), (0, 2, 4), (0, 0, 0), (0, 3, 0), (0, 4, 0), (1, 1, 2), (1, 2, 0), (1, 3, 0)]:
        logits[row, col, tag] = 1.0  # predictions at ignored and padded positions must not count
    s = task_scores(task, "dev", logits, None)
    # gold: PER (row 0), LOC (row 1); predicted: PER, ORG -> P = R = 1/2; words 2 of 3 right
    assert names[3] == "B-PER"
    assert s == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 2 / 3, "num_examples": 2, "num_words": 3,
         "num_unseen_words": 0, "num_windowed": 0}
    )  # fmt: skip


def test_evaluate_averages_the_loss_over_labelled_tokens(conll_dir, wordpiece):
    from transformers import BertConfig, BertForTokenClassification

    from qbert_hessian.evaluate import evaluate

    task = tokenize_task(load_raw_task("conll03", data_dir=conll_dir), wordpiece)
    cfg = BertConfig(
        vocab_size=len(wordpiece), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        num_labels=task.num_labels, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForTokenClassification(cfg).eval()
    # sentences with 5, 2 and 1 labelled words: per-batch means weighted by rows would differ
    metrics = evaluate(model, task, split="train", batch_size=2)
    with torch.no_grad():
        whole = float(model(**task.batch("train", [0, 1, 2])).loss)
    assert metrics["loss"] == pytest.approx(whole, rel=1e-5)
    assert metrics["num_examples"] == 3 and set(metrics) == {
        "precision",
        "recall",
        "f1",
        "accuracy",
        "loss",
        "num_examples",
        "num_words",
        "num_unseen_words",
        "num_windowed",
    }


def trainer_eval(model, task, out) -> tuple[dict[str, float], object]:
    """The dev metrics as the QAT Trainer computes them (its collator, compute_metrics and label padding)."""
    from transformers import Trainer, TrainingArguments

    from qbert_hessian.tasks import trainer_setup

    setup = trainer_setup(task)
    args = TrainingArguments(output_dir=str(out), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    trainer = Trainer(
        model=model, args=args, eval_dataset=task.dev, data_collator=setup.collator,
        compute_metrics=setup.compute_metrics,
    )  # fmt: skip
    return trainer.evaluate(), setup


def test_trainer_metrics_equal_evaluate(conll_dir, wordpiece, tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    from qbert_hessian.evaluate import evaluate

    (conll_dir / "valid.txt").write_text(CONLL_TRAIN, encoding="utf-8")  # 3 sentences of different lengths
    task = tokenize_task(load_raw_task("conll03", data_dir=conll_dir), wordpiece)
    cfg = BertConfig(
        vocab_size=len(wordpiece), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        num_labels=task.num_labels, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(2)
    model = BertForTokenClassification(cfg).eval()
    got, setup = trainer_eval(model, task, tmp_path / "trainer")
    want = evaluate(model, task)
    assert setup.metric == "f1" and setup.greater_is_better
    for k in ("f1", "precision", "recall", "accuracy"):
        assert got[f"eval_{k}"] == pytest.approx(want[k])


def test_qat_on_a_token_task_keeps_the_best_entity_f1(conll_dir, wordpiece, tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    from qbert_hessian.artifacts import BitPlan
    from qbert_hessian.config import QATConfig
    from qbert_hessian.evaluate import evaluate
    from qbert_hessian.qat import train_qat
    from qbert_hessian.quant.apply import quantize_model

    task = tokenize_task(load_raw_task("conll03", data_dir=conll_dir), wordpiece)
    cfg = BertConfig(
        vocab_size=len(wordpiece), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        num_labels=task.num_labels, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForTokenClassification(cfg).eval()
    q = quantize_model(model, BitPlan(model={}, blocks={"encoder.0": {"bits": 4, "groups": 1}}, act_bits=None))
    config = QATConfig(epochs=2, lr=1e-3, batch_size=2, warmup_ratio=0.0, eval_steps=1)
    result = train_qat(q, task, config, work_dir=tmp_path / "w", progress=False)
    f1s = [h["eval_f1"] for h in result["log_history"] if "eval_f1" in h]
    assert len(f1s) == result["steps"] == 4 and result["best_metric"] == max(f1s)
    assert evaluate(q, task)["f1"] == pytest.approx(max(f1s))  # the best checkpoint is the one kept


LONG = 200  # entities in one dev sentence


@pytest.fixture
def long_task(tmp_path):
    """A dev sentence of 200 entities (``good`` B-POS, ``the`` O, ``awful`` B-NEG ...) far past max_length 16."""
    from transformers import BertTokenizerFast

    from tests.helpers import write_vocab

    pattern = [("good", "B-POS"), ("the", "O"), ("awful", "B-NEG"), ("movie", "O")]
    long = [pattern[i % 4] for i in range(2 * LONG)]
    lines = [f"{w} NN O {t}" for w, t in long] + ["", "fun NN O B-POS", "plot NN O O", ""]
    (tmp_path / "valid.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    tok = BertTokenizerFast(vocab=str(write_vocab(tmp_path / "vocab.txt")), do_lower_case=True)
    return tokenize_task(load_raw_task("conll03", data_dir=tmp_path), tok, max_length=16)


def _one_hot(task, tags_of_row) -> np.ndarray:
    """Logits (rows, width, tags) choosing ``tags_of_row(row, labels)`` at every position."""
    width = max(len(r) for r in task.dev["labels"])
    logits = np.full((len(task.dev), width, task.num_labels), -100.0)
    for i, labels in enumerate(task.dev["labels"]):
        for j, tag in enumerate(tags_of_row(i, labels)):
            logits[i, j, tag] = 1.0
    return logits


def test_long_dev_sentences_are_scored_whole_in_windows(long_task):
    task, o = long_task, long_task.label_names.index("O")
    rows = list(zip(task.dev["example_index"], task.dev["word_index"], task.dev["labels"]))
    labelled = [(s, w) for s, index, _ in rows for w in index if w >= 0]
    # every word of every sentence is labelled exactly once, with its own tag
    assert sorted(labelled) == [(0, w) for w in range(2 * LONG)] + [(1, 0), (1, 1)]
    for s, index, labels in rows:
        assert all(lab == task.raw.dev_labels[s][w] for w, lab in zip(index, labels) if w >= 0)
        assert all(lab == -100 for w, lab in zip(index, labels) if w < 0)
    assert len(task.train) == 2  # training rows are still cut at max_length, one per sentence
    assert max(len(r) for r in task.dev["input_ids"]) <= 16 and len(task.dev) > 20

    perfect = task_scores(task, "dev", _one_hot(task, lambda i, labels: [o if t < 0 else t for t in labels]), None)
    assert perfect["f1"] == 1.0 and perfect["accuracy"] == 1.0
    assert perfect["num_words"] == 2 * LONG + 2 and perfect["num_windowed"] == 1 and perfect["num_unseen_words"] == 0

    # a model that sees only the first window (truncation): the entities it never saw count as missed
    first = [i for i, (s, _, _) in enumerate(rows) if s == 0][0]
    seen = sum(1 for t in rows[first][2] if t >= 0 and task.label_names[t].startswith("B-"))
    cut = _one_hot(task, lambda i, labels: [t if (i == first or rows[i][0] == 1) and t >= 0 else o for t in labels])
    s = task_scores(task, "dev", cut, None)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx((seen + 1) / (LONG + 1)) and seen < 10


def test_each_word_is_scored_in_its_window_of_most_context(long_task):
    task = long_task
    content, stride = 14, 14 // 3  # max_length 16 less [CLS] and [SEP]; a third shared with the next window
    windows = [(k * (content - stride), index) for k, index in enumerate(task.dev["word_index"][:-1])]
    assert [s for s in task.dev["example_index"]] == [0] * len(windows) + [1]
    for start, index in windows:
        n = len(index) - 2
        for j, w in enumerate(index[1:-1]):
            if w < 0:
                continue
            # every word here is one sub-token, at global position w; its context in each window holding it
            assert start + j == w
            options = [min(w - s0, s0 + len(ix) - 3 - w) for s0, ix in windows if s0 <= w < s0 + len(ix) - 2]
            assert min(j, n - 1 - j) == max(options)


def test_dev_words_without_sub_tokens_count_as_missed(conll_dir, wordpiece):
    (conll_dir / "valid.txt").write_text("German NNP B-NP B-MISC\n\u200b NN O B-LOC\nlamb NN O O\n")
    task = tokenize_task(load_raw_task("conll03", data_dir=conll_dir), wordpiece)
    gold = task.dev["labels"][0]
    logits = _one_hot(task, lambda i, labels: [task.label_names.index("O") if t < 0 else t for t in labels])
    s = task_scores(task, "dev", logits, None)
    assert gold.count(-100) == 2 and len(gold) == 4 and s["num_unseen_words"] == 1 and s["num_words"] == 3
    assert s["precision"] == 1.0 and s["recall"] == 0.5  # MISC found, the LOC the model never saw is missed


def test_evaluate_on_dev_windows(long_task):
    from transformers import BertConfig, BertForTokenClassification

    from qbert_hessian.evaluate import evaluate

    cfg = BertConfig(
        vocab_size=len(long_task.tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=20, num_labels=long_task.num_labels, max_position_embeddings=16,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    metrics = evaluate(BertForTokenClassification(cfg).eval(), long_task, batch_size=8)
    assert metrics["num_examples"] == 2 and metrics["num_words"] == 2 * LONG + 2 and np.isfinite(metrics["loss"])
