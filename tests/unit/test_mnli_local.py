"""``mnli-local``: MNLI from its two dev files (train on mismatched, score on matched), encoded as sentence pairs,
labels in GLUE's order; ``mnli-local-mm`` the other way round, and never scored on the split it trained on."""

from __future__ import annotations

import json

import pytest

from qbert_hessian.errors import QBHError
from qbert_hessian.stages import check_not_trained_on_dev
from qbert_hessian.tasks import load_raw_task, subset, tokenize_task
from qbert_hessian.tasks.classification import MNLI_LABELS
from tests.helpers import MNLI_HEADER, write_mnli_dir

GLUE_ORDER = ["entailment", "neutral", "contradiction"]


def _rows(path):
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]


@pytest.fixture
def mnli_dir(tmp_path):
    return write_mnli_dir(tmp_path / "mnli")


def test_split_is_fixed_mismatched_trains_matched_scores(mnli_dir):
    raw = load_raw_task("mnli-local", data_dir=mnli_dir)
    matched, mismatched = _rows(mnli_dir / "dev_matched.tsv"), _rows(mnli_dir / "dev_mismatched.tsv")
    assert raw.name == "mnli-local" and raw.family == "classification"
    assert raw.train_texts == [[r[2].strip() for r in mismatched], [r[3].strip() for r in mismatched]]
    assert raw.dev_texts == [[r[2].strip() for r in matched], [r[3].strip() for r in matched]]
    assert raw.label_names == GLUE_ORDER == list(MNLI_LABELS)
    assert raw.train_labels == [GLUE_ORDER.index(r[4]) for r in mismatched]
    assert raw.dev_labels == [GLUE_ORDER.index(r[4]) for r in matched]
    swapped = load_raw_task("mnli-local-mm", data_dir=mnli_dir)
    assert (swapped.train_texts, swapped.train_labels) == (raw.dev_texts, raw.dev_labels)
    assert (swapped.dev_texts, swapped.dev_labels) == (raw.train_texts, raw.train_labels)
    assert load_raw_task("mnli-local", data_dir=mnli_dir) == raw  # depends on nothing but the files


def test_labels_keep_glue_order_whatever_occurs(tmp_path):
    d = tmp_path / "mnli"
    d.mkdir()
    # Alphabetical order would be contradiction=0, entailment=1; GLUE ids 0..2 are read as GLUE numbers them.
    (d / "dev_mismatched.tsv").write_text(f"{MNLI_HEADER}\n0\tp\ta b\tc\tcontradiction\n1\tq\td e\tf\tentailment\n")
    (d / "dev_matched.tsv").write_text(f"{MNLI_HEADER}\n0\tr\tg h\ti\t1\n1\ts\tj k\tl\tcontradiction\n")
    raw = load_raw_task("mnli-local", data_dir=d)
    assert raw.label_names == GLUE_ORDER
    assert raw.train_labels == [2, 0] and raw.dev_labels == [1, 2]


def test_premise_and_hypothesis_are_encoded_as_a_pair(mnli_dir, tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    raw = load_raw_task("mnli-local", data_dir=mnli_dir)
    task = tokenize_task(raw, tokenizer, max_length=64)
    for split, texts in ((task.train, raw.train_texts), (task.dev, raw.dev_texts)):
        for i in (0, len(split) - 1):
            row = split[i]
            premise = tokenizer(texts[0][i], add_special_tokens=False)["input_ids"]
            hypothesis = tokenizer(texts[1][i], add_special_tokens=False)["input_ids"]
            cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
            assert row["input_ids"] == [cls, *premise, sep, *hypothesis, sep]
            # two segments: [CLS] premise [SEP] is segment 0, hypothesis [SEP] segment 1
            assert row["token_type_ids"] == [0] * (len(premise) + 2) + [1] * (len(hypothesis) + 1)
    assert task.num_labels == 3


def test_training_subset_is_seeded_and_drawn_from_mismatched_only(mnli_dir):
    raw = load_raw_task("mnli-local", data_dir=mnli_dir)
    a, b, c = subset(raw, 10, seed=0), subset(raw, 10, seed=0), subset(raw, 10, seed=1)
    assert a == b and a.train_texts != c.train_texts
    pairs = set(zip(*raw.train_texts))
    assert len(a.train_labels) == 10 and set(zip(*a.train_texts)) <= pairs
    assert (a.dev_texts, a.dev_labels) == (raw.dev_texts, raw.dev_labels)  # matched stays whole


@pytest.mark.parametrize(
    ("edit", "kwargs", "message"),
    [
        (lambda d: None, {"data_dir": None}, "task 'mnli-local' reads local files; pass --data DIR"),
        (lambda d: (d / "dev_mismatched.tsv").unlink(), {}, "no dev_mismatched file in"),
        (
            lambda d: (d / "dev_matched.tsv").write_text("idx\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n"),
            {},
            "column(s) premise, hypothesis not in",  # and no --text-columns hint
        ),
        (
            lambda d: (d / "dev_matched.tsv").write_text(f"{MNLI_HEADER}\n0\tp\ta\tb\t-\n"),
            {},
            "label '-' in",
        ),
        (lambda d: None, {"text_columns": ["premise"]}, "drop --text-columns/--label-column"),
    ],
    ids=["no-data", "missing-file", "wrong-columns", "no-gold-label", "text-columns"],
)
def test_bad_mnli_files_name_the_fix(mnli_dir, edit, kwargs, message):
    edit(mnli_dir)
    with pytest.raises(QBHError) as err:
        load_raw_task("mnli-local", **{"data_dir": mnli_dir, **kwargs})
    assert message in str(err.value)
    assert "--text-columns and" not in str(err.value)  # the columns are fixed: no option to name them


def test_a_checkpoint_is_not_scored_on_the_split_it_trained_on(mnli_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metrics.json").write_text(json.dumps({"stage": "finetune", "task": "mnli-local"}))
    check_not_trained_on_dev(ckpt, load_raw_task("mnli-local", data_dir=mnli_dir))  # its own dev split: fine
    with pytest.raises(QBHError, match="fine-tuned on task 'mnli-local', whose training split is the dev split"):
        check_not_trained_on_dev(ckpt, load_raw_task("mnli-local-mm", data_dir=mnli_dir))
    (ckpt / "metrics.json").write_text(json.dumps({"stage": "finetune", "task": "mnli-local-mm"}))
    with pytest.raises(QBHError, match="'mnli-local-mm'"):
        check_not_trained_on_dev(ckpt, load_raw_task("mnli-local", data_dir=mnli_dir))
