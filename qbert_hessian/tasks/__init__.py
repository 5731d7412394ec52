"""Task registry: one module per task family, dispatched by task name (raw data) and by family (the rest).

  family          tasks                            model head (Auto...)         loss, a mean over
  classification  sst2, glue/*, bbc-news,          ForSequenceClassification    CE; examples
                  mnli-local(-mm), folders
  token           conll03, ner (a folder)          ForTokenClassification       CE; labelled tokens (not -100)
  qa              squad, squad-local, squad-full   ForQuestionAnswering         (CE_start + CE_end) / 2; features

Each family gives: a reader (:func:`load_raw_task`), a tokenizer step (:func:`tokenize_task`), a collator
(:func:`~.base.collator`), its metric from stacked predictions (:func:`task_scores`, shared by
``evaluate`` and the Trainer) and its main metric (:func:`trainer_setup`). The length-bucket weight of a batch
follows from its targets alone (``hessian.hvp.loss_weight``), so ``hessian/`` never imports this package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import QBHError
from . import classification, qa, token
from .base import FAMILIES, MODEL_INPUTS, RawTask, Task, collator, dev_subset, subset
from .classification import BBC_DEV_FRACTION, BBC_NEWS, BBC_SPLIT_SEED, GLUE, TaskSpec, classification_metrics
from .labels import LABELS_FILE, match_labels

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BBC_DEV_FRACTION",
    "BBC_NEWS",
    "BBC_SPLIT_SEED",
    "FAMILIES",
    "GLUE",
    "LABELS_FILE",
    "MODEL_INPUTS",
    "RawTask",
    "Task",
    "TaskSpec",
    "TrainerSetup",
    "classification_metrics",
    "collator",
    "family_of_task",
    "load_raw_task",
    "load_task",
    "match_labels",
    "pad_stack",
    "subset",
    "dev_subset",
    "task_scores",
    "main_metric",
    "tokenize_task",
    "trainer_setup",
]

Scores = Callable[[Task, str, Any, Any], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class _Family:
    tokenize: Callable[..., Task]
    scores: Scores  # (task, split, predictions, label_ids) -> metrics
    main_metric: str


_FAMILY: dict[str, _Family] = {
    "classification": _Family(classification.tokenize_classification, classification.classification_scores, "accuracy"),
    "token": _Family(token.tokenize_token, token.token_scores, "f1"),
    "qa": _Family(qa.tokenize_qa, qa.qa_scores, "f1"),
}
# Readers of the non-classification families, and the task names that pick them.
_LOADERS: dict[str, Callable[..., RawTask]] = {"token": token.load_token, "qa": qa.load_qa}
_TASK_NAMES: dict[str, tuple[str, ...]] = {"token": token.TASK_NAMES, "qa": qa.TASK_NAMES}


def family_of_task(name: str) -> str:
    """The family of a task name: ``conll03``/``ner`` -> token, ``squad``/``squad-local``/``squad-full`` -> qa, else
    classification."""
    for family, names in _TASK_NAMES.items():
        if name.lower() in names:
            return family
    return "classification"


def load_raw_task(
    name: str,
    *,
    data_dir: Path | str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
) -> RawTask:
    """Read a task's texts and labels (no tokenizer needed), failing fast on missing files or bad records.

    Args:
        name: a classification task (``bbc-news``, ``sst2``, ``glue/mnli``, ``mnli-local``, a hub dataset or a
            folder), a token task (``conll03``, ``ner``) or a QA task (``squad``, ``squad-local``, ``squad-full``).
        data_dir: a folder with local train/dev files; overrides the hub.
        text_columns: classification only: the text column(s).
        label_column: classification only: the label column.
    """
    family = family_of_task(name)
    if family != "classification" and (text_columns or label_column):
        raise QBHError(f"--text-columns/--label-column apply to classification tasks, not '{name}'; drop them")
    if family == "classification":
        return classification.load_classification(
            name, data_dir=data_dir, text_columns=text_columns, label_column=label_column
        )
    return _LOADERS[family](name, data_dir=data_dir)


def tokenize_task(raw: RawTask, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 128, **options: Any) -> Task:
    """Tokenize both splits the family's way (truncation to ``max_length``; ``options`` go to the family)."""
    return _FAMILY[raw.family].tokenize(raw, tokenizer, max_length=max_length, **options)


def load_task(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_dir: Path | str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    max_length: int = 128,
) -> Task:
    """Read and tokenize a task; see :func:`load_raw_task` for the sources."""
    raw = load_raw_task(name, data_dir=data_dir, text_columns=text_columns, label_column=label_column)
    return tokenize_task(raw, tokenizer, max_length=max_length)


def task_scores(task: Task, split: str, predictions: Any, label_ids: Any) -> dict[str, float]:
    """The family's metric from predictions stacked over the split's rows, in order.

    Args:
        task: the tokenized task.
        split: ``dev`` or ``train`` (QA maps features of that split back to its examples).
        predictions: logits, (rows, classes) or (rows, width, tags); for QA a pair (start, end) of (rows, width).
            Rows padded to a common width carry -100 beyond their own length (as the Trainer pads them).
        label_ids: the targets stacked the same way (QA ignores them: the gold answers are texts).
    """
    return _FAMILY[task.family].scores(task, split, predictions, label_ids)


@dataclasses.dataclass(frozen=True)
class TrainerSetup:
    """What a transformers ``Trainer`` needs to train and select checkpoints on a task."""

    metric: str
    greater_is_better: bool
    compute_metrics: Callable[[Any], dict[str, float]]
    collator: Callable[[list[dict[str, Any]]], dict]


def main_metric(family: str) -> str:
    """The family's main dev metric, the one QAT keeps checkpoints by: ``accuracy``, entity ``f1`` or SQuAD ``f1``."""
    return _FAMILY[family].main_metric


def trainer_setup(task: Task) -> TrainerSetup:
    """The family's main dev metric (accuracy / entity F1 / SQuAD F1), its ``compute_metrics`` and collator."""

    def compute(pred: Any) -> dict[str, float]:
        predictions = pred.predictions
        if task.family != "qa" and isinstance(predictions, tuple):
            predictions = predictions[0]
        return task_scores(task, "dev", predictions, pred.label_ids)

    return TrainerSetup(main_metric(task.family), True, compute, collator(task.family, task.tokenizer))


def pad_stack(rows: Sequence[np.ndarray], value: float = -100) -> np.ndarray:
    """Arrays (n_i, w_i, ...) -> one (sum n_i, max w_i, ...) array, padded with ``value`` (as the Trainer does)."""
    if rows[0].ndim == 1:
        return np.concatenate(rows)
    width = max(r.shape[1] for r in rows)
    padded = [
        np.pad(r, [(0, 0), (0, width - r.shape[1])] + [(0, 0)] * (r.ndim - 2), constant_values=value) for r in rows
    ]
    return np.concatenate(padded)
