"""The two task containers every family fills: :class:`RawTask` (untokenized) and :class:`Task` (tokenized).

A family says what one example and one label are:

  * ``classification``: ``texts`` holds one list of strings per text column; a label is a class id.
  * ``token``: ``texts`` holds one column of word lists; a label is the list of tag ids of those words.
  * ``qa``: ``texts`` holds the questions and the contexts; a label is ``{"text": [...], "answer_start": [...]}``
    (the gold answers, character offsets into the context).

So :func:`subset` and ``len(raw.label_names)`` work the same for all of them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import QBHError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

FAMILIES = ("classification", "token", "qa")
# What an HF encoder's forward takes; anything else in a row (offsets, example ids) is bookkeeping.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")


@dataclasses.dataclass
class RawTask:
    """Untokenized splits: text columns and one label per example (see the module docstring per family)."""

    name: str
    train_texts: list[list[Any]]
    train_labels: list[Any]
    dev_texts: list[list[Any]]
    dev_labels: list[Any]
    label_names: list[str]
    family: str = "classification"


@dataclasses.dataclass
class Task:
    """A tokenized task ready for training, evaluation and curvature.

    ``train`` and ``dev`` are ``datasets.Dataset`` objects with ``input_ids``, ``attention_mask``
    (``token_type_ids`` where the tokenizer makes them) and the family's targets: ``labels`` (one per example
    for classification, one per token for ``token``) or ``start_positions``/``end_positions`` (``qa``, whose
    rows are features: windows of a context). :meth:`batch` pads a list of rows dynamically; ``raw`` keeps the
    untokenized splits where evaluation needs them (QA maps token spans back to context text).
    """

    name: str
    train: Dataset
    dev: Dataset
    label_names: list[str]
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    family: str = "classification"
    raw: RawTask | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Model inputs of ``rows`` padded to the longest (the family's transformers collator)."""
        return collator(self.family, self.tokenizer)([{k: r[k] for k in MODEL_INPUTS if k in r} for r in rows])

    def batch(self, split: str, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows ``indices`` of ``split`` (``train`` or ``dev``) as one padded batch."""
        data = self.train if split == "train" else self.dev
        return self.collate([data[int(i)] for i in indices])


def collator(family: str, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict[str, Any]]], dict]:
    """transformers' collator for the family: token labels are padded with -100, the rest as usual."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if family == "token":
        return DataCollatorForTokenClassification(tokenizer, return_tensors="pt")
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def _seeded_rows(n: int, keep: int | None, seed: int) -> list[int] | None:
    """``keep`` of ``n`` row indices drawn with ``seed``, in their order (None: keep every row)."""
    if keep is None or keep >= n:
        return None
    return sorted(np.random.default_rng(seed).choice(n, size=keep, replace=False).tolist())


def subset(raw: RawTask, max_train: int | None, seed: int = 0) -> RawTask:
    """A seeded subset of the training split (the dev split is kept whole)."""
    idx = _seeded_rows(len(raw.train_labels), max_train, seed)
    if idx is None:
        return raw
    return dataclasses.replace(
        raw,
        train_texts=[[col[i] for i in idx] for col in raw.train_texts],
        train_labels=[raw.train_labels[i] for i in idx],
    )


def dev_subset(raw: RawTask, max_dev: int | None, seed: int = 0) -> RawTask:
    """A seeded subset of ``max_dev`` dev examples, kept in their order (None, or at least the split: all)."""
    idx = _seeded_rows(len(raw.dev_labels), max_dev, seed)
    if idx is None:
        return raw
    return dataclasses.replace(
        raw,
        dev_texts=[[col[i] for i in idx] for col in raw.dev_texts],
        dev_labels=[raw.dev_labels[i] for i in idx],
    )


def read_text(path: Path) -> str:
    """A data file's text; a file that is not UTF-8 is refused with the line of its first bad byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise QBHError(f"'{path}' is not UTF-8 text (line {line}); convert it, e.g. iconv -t UTF-8") from None


def hub_dataset(name: str, *path: str, local: str) -> Any:
    """``datasets.load_dataset(*path)`` for task ``name``, every failure one line whose fix is ``local`` (what to
    pass instead). A machine that cannot reach the hub is refused at once, before the hub clients' retries (about
    26 s), unless an offline mode is set: datasets then reads its cache without retrying."""
    from datasets import load_dataset

    from ..hub import OFFLINE_ENV, hub_reachable

    if not any(os.environ.get(k) for k in OFFLINE_ENV) and not hub_reachable():
        raise QBHError(
            f"task '{name}' needs the Hugging Face Hub, which is not reachable from here; {local}, or set "
            "HF_HUB_OFFLINE=1 to read a dataset cached earlier"
        )
    try:
        return load_dataset(*path)
    except Exception as exc:  # noqa: BLE001  (network, auth and not-found errors come in many types)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise QBHError(f"could not load task '{name}' from the Hugging Face Hub ({first}); {local}") from None
