"""Token classification (named-entity recognition): CoNLL-2003 and any folder in its column format.

Sources:
  * ``--task conll03 --data DIR``: ``train.txt`` and ``valid.txt`` (or ``dev.txt`` / ``validation.txt``) in the
    CoNLL column format: one ``TOKEN ... TAG`` line per word (CoNLL-2003: ``TOKEN POS CHUNK NER``; the tag is
    the last column), a blank line after each sentence, ``-DOCSTART-`` lines skipped.
  * ``--task ner --data DIR``: the same files, or ``train.jsonl`` / ``dev.jsonl`` with ``{"tokens": [...],
    "tags": [...]}`` per line.
  * ``--task conll03`` online: the hub dataset ``conll2003``.

Tag names come from the training split, sorted (``O`` included); a dev tag unseen in training is an error.
Labels are aligned to sub-tokens as HF's ``run_ner`` example does: the first sub-token of a word carries its
tag, the other sub-tokens and the special tokens carry -100, which the loss ignores. So the loss is

    L = (1 / |T|) sum_{t in T} CE(z_t, y_t),   T = the labelled (first) sub-tokens,

and the metric is entity-level precision / recall / F1 over those positions (``seqeval``, CoNLL rules, as
``run_ner`` reports it) plus token accuracy. Words cut off by ``max_length`` carry no label and are scored
neither in the loss nor in the metric.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import QBHError
from .base import RawTask, Task, hub_dataset, read_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASK_NAMES = ("conll03", "conll2003", "ner")
DOCSTART = "-DOCSTART-"
IGNORE = -100
_TRAIN = ("train.txt", "train.conll", "train.jsonl")
_DEV = ("valid.txt", "dev.txt", "validation.txt", "valid.conll", "dev.conll", "dev.jsonl", "validation.jsonl")

Sentences = tuple[list[list[str]], list[list[str]]]  # (words per sentence, tags per sentence)


def read_conll(path: Path) -> Sentences:
    """Sentences of a CoNLL column file: words from the first column, tags from the last.

    Raises:
        QBHError: a line whose column count differs from the file's first word line, a line with fewer
            than two columns, or a file without sentences.
    """
    words: list[list[str]] = []
    tags: list[list[str]] = []
    cur_w: list[str] = []
    cur_t: list[str] = []
    width = None
    for number, line in enumerate(read_text(path).split("\n"), 1):  # as a file iterates: only \n ends a line
        cols = line.split()
        if not cols or cols[0] == DOCSTART:
            if cur_w:
                words.append(cur_w)
                tags.append(cur_t)
            cur_w, cur_t = [], []
            continue
        width = width or len(cols)
        if len(cols) != width or width < 2:
            raise QBHError(
                f"'{path}' line {number}: expected {max(width, 2)} space-separated columns (TOKEN ... TAG), "
                f"found {len(cols)}; fix the line"
            )
        cur_w.append(cols[0])
        cur_t.append(cols[-1])
    if cur_w:
        words.append(cur_w)
        tags.append(cur_t)
    if not words:
        raise QBHError(f"'{path}' holds no sentences; expected TOKEN ... TAG lines with a blank line after each")
    return words, tags


def read_jsonl(path: Path) -> Sentences:
    """Sentences of a JSONL file with ``tokens`` and ``tags`` lists of equal length on every line."""
    words: list[list[str]] = []
    tags: list[list[str]] = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QBHError(f"'{path}' line {number} is not valid JSON ({exc.msg}); fix the line") from None
        toks, tgs = (record.get("tokens"), record.get("tags")) if isinstance(record, dict) else (None, None)
        if not isinstance(toks, list) or not isinstance(tgs, list) or len(toks) != len(tgs) or not toks:
            raise QBHError(
                f'\'{path}\' line {number}: expected {{"tokens": [...], "tags": [...]}} with one tag per token; '
                "fix the line"
            )
        words.append([str(t) for t in toks])
        tags.append([str(t) for t in tgs])
    if not words:
        raise QBHError(f"'{path}' holds no sentences; expected one JSON object per line")
    return words, tags


def _find(data_dir: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise QBHError(f"no {names[0].split('.')[0]} file in '{data_dir}': expected one of {', '.join(names)}")


def _read(path: Path) -> Sentences:
    return read_jsonl(path) if path.suffix == ".jsonl" else read_conll(path)


def tag_ids(name: str, train: Sentences, dev: Sentences, dev_source: str) -> RawTask:
    """Tags -> ids over the sorted training tag set; a dev tag unseen in training is an error."""
    names = sorted({t for sent in train[1] for t in sent})
    index = {t: i for i, t in enumerate(names)}
    unseen = sorted({t for sent in dev[1] for t in sent} - set(index))
    if unseen:
        raise QBHError(f"dev tags {unseen[:5]} in '{dev_source}' do not occur in the training split; fix the data")
    return RawTask(
        name,
        [train[0]],
        [[index[t] for t in sent] for sent in train[1]],
        [dev[0]],
        [[index[t] for t in sent] for sent in dev[1]],
        names,
        family="token",
    )


def _hub(name: str) -> RawTask:
    ds = hub_dataset(name, "conll2003", local="pass --data DIR with train.txt and valid.txt in the CoNLL column format")
    tag_names = ds["train"].features["ner_tags"].feature.names

    def split(s: str) -> Sentences:
        return list(ds[s]["tokens"]), [[tag_names[i] for i in row] for row in ds[s]["ner_tags"]]

    return tag_ids(name, split("train"), split("validation"), "conll2003 (hub)")


def load_token(name: str, *, data_dir: Path | str | None = None) -> RawTask:
    """Read a token-classification task; see the module docstring for the sources."""
    if data_dir is None:
        if name.lower() == "ner":
            raise QBHError("task 'ner' reads local files; pass --data DIR with train.txt and dev.txt (or .jsonl)")
        return _hub(name)
    data = Path(data_dir)
    if not data.is_dir():
        raise QBHError(f"data folder '{data}' does not exist; pass a folder holding train.txt and valid.txt")
    train_path, dev_path = _find(data, _TRAIN), _find(data, _DEV)
    return tag_ids(name.lower(), _read(train_path), _read(dev_path), str(dev_path))


def align_labels(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    """One label per sub-token: the word's tag on its first sub-token, -100 elsewhere (specials included)."""
    labels, previous = [], None
    for w in word_ids:
        labels.append(IGNORE if w is None or w == previous else tags[w])
        previous = w
    return labels


def tokenize_token(raw: RawTask, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 128) -> Task:
    """Tokenize pre-split words (truncated to ``max_length``) and align the tags to first sub-tokens."""
    from datasets import Dataset

    if not tokenizer.is_fast:
        raise QBHError("token classification needs a fast tokenizer (word_ids); load one with use_fast=True")

    def encode(words: list[list[str]], tags: list[list[int]]) -> Dataset:
        try:
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        except ValueError as exc:
            first = str(exc).strip().splitlines()[0]
            raise QBHError(f"the tokenizer cannot take pre-split words ({first}); use a BERT-style tokenizer") from None
        labels = [align_labels(enc.word_ids(i), t) for i, t in enumerate(tags)]
        return Dataset.from_dict({**enc, "labels": labels})

    return Task(
        raw.name,
        encode(raw.train_texts[0], raw.train_labels),
        encode(raw.dev_texts[0], raw.dev_labels),
        raw.label_names,
        tokenizer,
        max_length,
        family="token",
        raw=raw,
    )


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval, CoNLL rules) and token accuracy of tag sequences."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "accuracy": float(accuracy_score(gold, pred)),
    }


def token_scores(task: Task, split: str, predictions: Any, label_ids: Any) -> dict[str, float]:
    """The metric from logits (rows, width, tags) or tag ids (rows, width) and labels (rows, width), -100 padded."""
    pred = np.asarray(predictions)
    pred = pred.argmax(-1) if pred.ndim == 3 else pred
    labels = np.asarray(label_ids)
    names = task.label_names
    gold_tags, pred_tags = [], []
    for p_row, l_row in zip(pred, labels):
        keep = l_row != IGNORE
        gold_tags.append([names[i] for i in l_row[keep]])
        pred_tags.append([names[i] for i in p_row[keep]])
    return {**entity_scores(gold_tags, pred_tags), "num_examples": len(labels)}
