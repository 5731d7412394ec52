"""Token classification (named-entity recognition): CoNLL-2003 and any folder in its column format.

Sources:
  * ``--task conll03 --data DIR``: ``train.txt`` and ``valid.txt`` (or ``dev.txt`` / ``validation.txt``) in the
    CoNLL column format: one ``TOKEN ... TAG`` line per word (CoNLL-2003: ``TOKEN POS CHUNK NER``; the tag is
    the last column), a blank line after each sentence, ``-DOCSTART-`` lines skipped.
  * ``--task ner --data DIR``: the same files, or ``train.jsonl`` / ``dev.jsonl`` with ``{"tokens": [...],
    "tags": [...]}`` per line.
  * ``--task conll03`` online: the hub dataset ``conll2003``.

Tags are IOB/IOB2 strings (``O``, ``B-TYPE``, ``I-TYPE``); anything else (``b-per``, integers) is refused,
except integers named by a ``labels.txt`` beside the files (line i names tag i, as HF's ``conll2003``
``ner_tags`` features do). Tag names come from ``labels.txt`` or the training split, sorted (``O``
included); a dev tag unseen in training is an error. Labels are aligned to sub-tokens as HF's ``run_ner``
example does: the first sub-token of a word carries its tag, the other sub-tokens and the special tokens carry
-100, which the loss ignores. So the loss is

    L = (1 / |T|) sum_{t in T} CE(z_t, y_t),   T = the labelled (first) sub-tokens,

and the metric is entity-level precision / recall / F1 (``seqeval``, CoNLL rules, as ``run_ner`` reports it)
plus word accuracy, on the full gold: every word of every sentence. Training rows are cut at ``max_length``
(the words past it carry no label). Dev sentences longer than that are cut into overlapping windows of
``max_length`` tokens, ``stride`` = a third of a window shared with the next (as QA's contexts are); each word is
labelled in the one window where it has the most context on both sides (BERT's "max context"), so the dev
loss and the metric see every word once. A word the model never sees (no sub-token, e.g. a lone control
character, or cut from a training row) counts as predicted ``O``; the metrics say how many
(``num_words``, ``num_unseen_words``, ``num_windowed``: sentences scored over several windows).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import QBHError
from .base import RawTask, Task, hub_dataset, read_text
from .labels import LABELS_FILE, is_integer_name, label_index, order_labels, read_label_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASK_NAMES = ("conll03", "conll2003", "ner")
DOCSTART = "-DOCSTART-"
IGNORE = -100
_TRAIN = ("train.txt", "train.conll", "train.jsonl")
_DEV = ("valid.txt", "dev.txt", "validation.txt", "valid.conll", "dev.conll", "dev.jsonl", "validation.jsonl")

Sentences = tuple[list[list[str]], list[list[str]]]  # (words per sentence, tags per sentence)
IOB_TAG = re.compile(r"O|[BI]-\S+")


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


def check_tags(tags: Sequence[str], source: str) -> None:
    """Every tag is an IOB/IOB2 string (``O``, ``B-TYPE``, ``I-TYPE``); seqeval would read anything else as
    no entity at all, and every F1 would be 0.

    Raises:
        QBHError: integer tags (without ``labels.txt``) or tags such as ``b-per``, ``PER``, ``junk``.
    """
    numbers = sorted({t for t in tags if is_integer_name(t)}, key=int)
    if numbers:
        raise QBHError(
            f"the tags of {source} are integers ({', '.join(numbers[:5])} ...) without names; write the tag names in "
            f"{LABELS_FILE} beside the data (line i names tag i, e.g. O, B-PER, I-PER, ...), or use tag strings"
        )
    bad = sorted({t for t in tags if not IOB_TAG.fullmatch(t)})
    if bad:
        raise QBHError(
            f"tags {', '.join(repr(t) for t in bad[:5])} of {source} are not IOB/IOB2 tags (O, B-TYPE, I-TYPE: "
            "upper-case B or I, a hyphen, the entity type); fix the data"
        )


def tag_ids(
    name: str, train: Sentences, dev: Sentences, source: str, names: list[str] | None = None, dev_source: str = ""
) -> RawTask:
    """Tags -> ids over the sorted training tag set, or over ``names`` (``labels.txt``; integer tags are ids into
    it). A tag that is not IOB/IOB2 is an error naming ``source``; a dev tag unseen in training, ``dev_source``."""
    given = names is not None
    check_tags(names if given else sorted({t for sent in [*train[1], *dev[1]] for t in sent}), source)
    every = [t for sent in train[1] for t in sent] + ([t for sent in dev[1] for t in sent] if given else [])
    names = order_labels(every, names, source)
    index = {t: i for i, t in enumerate(names)}
    unseen = [] if given else sorted({t for sent in dev[1] for t in sent} - set(index))
    if unseen:
        where = dev_source or source
        raise QBHError(f"dev tags {unseen[:5]} in {where} do not occur in the training split; fix the data")
    return RawTask(
        name,
        [train[0]],
        [[label_index(t, names, index) for t in sent] for sent in train[1]],
        [dev[0]],
        [[label_index(t, names, index) for t in sent] for sent in dev[1]],
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
    train, dev = _read(train_path), _read(dev_path)
    return tag_ids(name.lower(), train, dev, f"'{data}'", read_label_file(data), dev_source=f"'{dev_path}'")


def label_positions(word_ids: Sequence[Sequence[int | None]], rows: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Which word each position of each row is labelled with (-1: none): a word's first sub-token carries its
    tag, once per sentence, in the row where it has the most context (min of tokens left and right in the row;
    the earlier row on a tie), as BERT's SQuAD code picks a token's window. Other sub-tokens, special tokens and
    the second copy of a word in an overlapping window get -1.

    Args:
        word_ids: per row, the word of each position (None: a special token), as ``enc.word_ids(i)``.
        rows: per row, (its sentence, the position of its first content token in the sentence's sub-tokens).
    """
    first: dict[tuple[int, int], int] = {}  # (sentence, word) -> position of its first sub-token
    for ids, (sentence, start) in zip(word_ids, rows):
        for j, w in enumerate(w for w in ids if w is not None):
            first[(sentence, w)] = min(first.get((sentence, w), start + j), start + j)
    best: dict[tuple[int, int], tuple[int, int]] = {}  # (sentence, word) -> (context, row)
    for i, (ids, (sentence, start)) in enumerate(zip(word_ids, rows)):
        content = [w for w in ids if w is not None]
        for j, w in enumerate(content):
            context = min(j, len(content) - 1 - j)
            if start + j == first[(sentence, w)] and context > best.get((sentence, w), (-1, -1))[0]:
                best[(sentence, w)] = (context, i)
    out = []
    for i, (ids, (sentence, _)) in enumerate(zip(word_ids, rows)):
        previous, row = None, []
        for w in ids:
            row.append(w if w is not None and w != previous and best[(sentence, w)][1] == i else -1)
            previous = w
        out.append(row)
    return out


def window_stride(tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[int, int]:
    """(content tokens per window, tokens shared with the next window: a third) at ``max_length``."""
    content = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if content < 1:
        raise QBHError(
            f"--max-length {max_length} leaves no room for words (the tokenizer adds "
            f"{max_length - content} special tokens); raise it (128 is usual)"
        )
    return content, content // 3


def _encode(
    tokenizer: PreTrainedTokenizerBase, words: list[list[str]], tags: list[list[int]], max_length: int, windows: bool
) -> dict[str, list[Any]]:
    """Rows of ``words``: cut at ``max_length`` (one row per sentence), or with ``windows`` overlapping windows
    covering every sub-token, each word labelled in the window where it has the most context.

    Besides the model inputs and ``labels``, each row holds ``example_index`` (its sentence) and ``word_index``
    (per position, the word labelled there, -1 elsewhere), so scores map back to every word of every sentence.
    """
    content, stride = window_stride(tokenizer, max_length)
    extra = {"stride": stride, "return_overflowing_tokens": True} if windows else {}
    try:
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, **extra)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise QBHError(f"the tokenizer cannot take pre-split words ({first}); use a BERT-style tokenizer") from None
    num_rows = len(enc["input_ids"])
    samples = list(enc.pop("overflow_to_sample_mapping")) if windows else list(range(num_rows))
    # the k-th window of a sentence starts at its sub-token k * (content - stride) (the tokenizer's overflow)
    rows, seen = [], {}
    for sentence in samples:
        k = seen[sentence] = seen.get(sentence, -1) + 1
        rows.append((sentence, k * (content - stride)))
    word_index = label_positions([enc.word_ids(i) for i in range(num_rows)], rows)
    labels = [[IGNORE if w < 0 else tags[s][w] for w in index] for s, index in zip(samples, word_index)]
    return {**enc, "labels": labels, "example_index": samples, "word_index": word_index}


def tokenize_token(raw: RawTask, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 128) -> Task:
    """Tokenize pre-split words and align the tags to first sub-tokens: training rows cut at ``max_length``,
    dev sentences in overlapping windows so every word is scored (see the module docstring)."""
    from datasets import Dataset

    if not tokenizer.is_fast:
        raise QBHError("token classification needs a fast tokenizer (word_ids); load one with use_fast=True")
    train = _encode(tokenizer, raw.train_texts[0], raw.train_labels, max_length, windows=False)
    dev = _encode(tokenizer, raw.dev_texts[0], raw.dev_labels, max_length, windows=True)
    if all(w < 0 for row in dev["word_index"] for w in row):
        raise QBHError(
            f"no dev word of task '{raw.name}' has a sub-token in this model's vocabulary (the tokenizer drops them "
            "all), so nothing can be scored; check the dev file's words and encoding"
        )
    return Task(
        raw.name,
        Dataset.from_dict(train),
        Dataset.from_dict(dev),
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
    """The metric on the split's full gold, from logits (rows, width, tags) or tag ids (rows, width) stacked
    over its rows in order (-100 padded); ``label_ids`` are not needed: the gold tags come from the raw data.

    A word is predicted at the position its row labels (``word_index``); a word no row labels (no sub-token, or
    cut from a training row) is predicted ``O``, so its entity counts as missed.
    """
    pred = np.asarray(predictions)
    pred = pred.argmax(-1) if pred.ndim == 3 else pred
    data = task.dev if split == "dev" else task.train
    if task.raw is None or "word_index" not in data.column_names:
        raise QBHError("token scores need the task's words; build the task with tokenize_task")
    words = task.raw.dev_texts[0] if split == "dev" else task.raw.train_texts[0]
    gold_ids = task.raw.dev_labels if split == "dev" else task.raw.train_labels
    names = task.label_names
    predicted: list[list[str | None]] = [[None] * len(w) for w in words]
    for row, sentence, index in zip(pred, data["example_index"], data["word_index"]):
        for position, w in enumerate(index):
            if w >= 0:
                predicted[sentence][w] = names[int(row[position])]
    unseen = sum(t is None for sent in predicted for t in sent)
    pred_tags = [["O" if t is None else t for t in sent] for sent in predicted]
    gold_tags = [[names[i] for i in sent] for sent in gold_ids]
    counts = Counter(data["example_index"])
    return {
        **entity_scores(gold_tags, pred_tags),
        "num_examples": len(words),
        "num_words": sum(len(w) for w in words),
        "num_unseen_words": unseen,
        "num_windowed": sum(c > 1 for c in counts.values()),
    }
