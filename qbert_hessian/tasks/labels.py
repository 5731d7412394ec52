"""Label names: the order of a task's classes (or NER tags), and matching it to a trained head's ``id2label``.

A class id means nothing without its name. The data names its labels when they are strings, when a hub dataset's
features carry names (``ClassLabel``), or when a ``labels.txt`` beside the local files says what its integers
mean (line i names label i). A checkpoint names them in ``config.id2label``, unless it holds transformers'
placeholders ``LABEL_0, LABEL_1, ...``.

Order of a fresh head (fine-tuning from a base model): ``labels.txt`` when given; else a known label set's
conventional order (:data:`KNOWN_ORDERS`: MNLI's entailment=0, neutral=1, contradiction=2, as GLUE and every
Hugging Face MNLI checkpoint have it); else integers numerically and strings alphabetically.

Against a trained head (:func:`match_labels`): the same names in another order are renumbered to the head's
order; names that differ, or integers without names against a head that names its classes, are refused with
both orders in the message, never scored against permuted classes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import QBHError

if TYPE_CHECKING:
    from .base import RawTask

LABELS_FILE = "labels.txt"
# Label sets whose conventional order is not alphabetical: the first matching set fixes a fresh head's order.
KNOWN_ORDERS: tuple[tuple[str, ...], ...] = (("entailment", "neutral", "contradiction"),)  # GLUE MNLI
_PLACEHOLDER = re.compile(r"LABEL_(\d+)")
_INTEGER = re.compile(r"-?\d+")


def is_integer_name(name: Any) -> bool:
    """An integer label (``3`` or ``"3"``): a class id, not a name."""
    return (
        isinstance(name, int) and not isinstance(name, bool) or isinstance(name, str) and bool(_INTEGER.fullmatch(name))
    )


def read_label_file(data_dir: Path) -> list[str] | None:
    """``labels.txt`` in ``data_dir`` (one name per line, line i names label i), or None when absent.

    Raises:
        QBHError: an empty file, an empty line between names, or a name given twice.
    """
    path = data_dir / LABELS_FILE
    if not path.is_file():
        return None
    from .base import read_text

    names = [line.strip() for line in read_text(path).rstrip("\n").split("\n")]
    if not names or any(not n for n in names):
        raise QBHError(f"'{path}' must name one label per line (line i names label i), without blank lines; fix it")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise QBHError(f"'{path}' names {', '.join(twice)} more than once; each label once, line i names label i")
    return names


def order_labels(values: Sequence[Any], names: Sequence[str] | None, source: str) -> list[str]:
    """The label names in id order for raw label ``values`` (ints or strings) of a training split.

    Args:
        values: every raw label of the split (or of both splits).
        names: ``labels.txt``'s names, when the data has one.
        source: the data, for messages.

    Returns:
        ``names`` when given, a known set's order, else integers numerically and strings alphabetically.

    Raises:
        QBHError: with ``names``, an integer outside 0..len(names)-1 or a string label that is not one of them.
    """
    seen = {str(v) for v in values}
    if names is not None:
        for v in sorted(seen):
            if is_integer_name(v):
                if not 0 <= int(v) < len(names):
                    raise QBHError(
                        f"label {v} of {source} has no name: {LABELS_FILE} names {len(names)} labels "
                        f"(0..{len(names) - 1}); fix the data or {LABELS_FILE}"
                    )
            elif v not in names:
                raise QBHError(f"label '{v}' of {source} is not named in {LABELS_FILE} ({', '.join(names)}); fix one")
        return list(names)
    for known in KNOWN_ORDERS:
        if seen == set(known):
            return list(known)
    return sorted(seen, key=lambda s: (0, int(s), s) if is_integer_name(s) else (1, 0, s))


def label_index(value: Any, names: Sequence[str], index: Mapping[str, int]) -> int:
    """The id of one raw label: its name's position, or an integer's own value when ``names`` name integers."""
    text = str(value)
    if text in index:
        return index[text]
    return int(text)  # an integer label whose name comes from labels.txt (checked by order_labels)


def integers_unnamed(names: Sequence[str]) -> bool:
    """The data's labels are integers without names (their 'names' are the integers themselves)."""
    return all(is_integer_name(n) for n in names)


def head_names(id2label: Mapping[Any, str] | None, num_labels: int) -> list[str] | None:
    """A checkpoint's label names in id order, or None when it names nothing (transformers' ``LABEL_i``)."""
    if not id2label or len(id2label) != num_labels:
        return None
    try:
        names = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in range(num_labels)]
    except KeyError:
        return None
    if all((m := _PLACEHOLDER.fullmatch(n)) and int(m.group(1)) == i for i, n in enumerate(names)):
        return None
    return names


def _show(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(f"{i}={n}" for i, n in enumerate(names[:limit]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def match_labels(raw: RawTask, id2label: Mapping[Any, str] | None, model: str) -> RawTask:
    """``raw`` renumbered to a trained head's label order, matched by name.

    Args:
        raw: the task data (classification or token; QA has no classes and is returned as it is).
        id2label: the checkpoint's ``config.id2label``.
        model: the checkpoint, for messages.

    Returns:
        ``raw`` itself when the head names nothing (``LABEL_i``), has another number of labels (the head-size
        check refuses that), or has the data's order; else a copy whose ids follow the head's order.

    Raises:
        QBHError: the names differ (both orders named), or the data's labels are integers without names while
            the head names its classes.
    """
    if raw.family == "qa":
        return raw
    names = head_names(id2label, len(raw.label_names))
    if names is None or names == list(raw.label_names):
        return raw
    what = "tags" if raw.family == "token" else "labels"
    if set(names) == set(raw.label_names):
        new = {n: i for i, n in enumerate(names)}
        perm = [new[n] for n in raw.label_names]  # old id -> the head's id

        def renumber(labels: list[Any]) -> list[Any]:
            if raw.family == "token":
                return [[perm[t] for t in sent] for sent in labels]
            return [perm[y] for y in labels]

        return dataclasses.replace(
            raw, train_labels=renumber(raw.train_labels), dev_labels=renumber(raw.dev_labels), label_names=names
        )
    if integers_unnamed(raw.label_names) and not integers_unnamed(names):
        raise QBHError(
            f"the data's {what} are integers without names, while model '{model}' names its {what} ({_show(names)}); "
            f"say what the integers mean in {LABELS_FILE} beside the data (line i names {what[:-1]} i) or use the "
            "names in the data"
        )
    raise QBHError(
        f"the data's {what} ({_show(raw.label_names)}) are not model '{model}''s ({_show(names)}); pass the model "
        "fine-tuned on these labels, or rename the data's labels to the model's"
    )
