"""Extractive question answering: SQuAD v1.1 (Rajpurkar et al. 2016), preprocessed as HF's ``run_qa`` example.

Sources:
  * ``--task squad --data DIR``: the official JSON files ``train*.json`` and ``dev*.json`` in DIR
    (``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
    "answer_start"}]}]}]}]}``); every ``answer_start`` must point at its answer text in the context.
  * ``--task squad-local --data DIR``: a fixed split for machines holding only part of the train set (such as
    ``shared/data/squad``, with the first 11 train articles): train = all train articles + the first half of
    the dev articles (articles 0 .. n/2 - 1 by index, n/2 rounded down), dev = the other half. No dev article
    is in both; the split depends on nothing but the files.
  * ``--task squad-full --data DIR``: train on every article of ``train*.json``, score on ``dev*.json``
    (``--task squad --data DIR`` reads the same, under a name that does not say so), made for
    ``shared/data/squad-full``: the whole train split (442 articles, 87,599 questions, reconstructed: synthetic
    question ids after article 11, ``answer_start`` inferred) beside the official dev file. Train on a seeded
    subset of questions with ``--max-train-samples`` (``[finetune]``/``[qat] max_train_samples``).
  * ``--task squad`` online: the hub dataset ``squad``.

A dev file is scored, so it must be official data: one holding reconstructed question ids (``recon-...``, as
the reconstructed train file has them) is refused by every local task.

Features: question first, context second, ``truncation="only_second"``, windows of ``max_length`` tokens
overlapping by ``stride`` tokens (default ``max_length // 3``: 128 at the usual 384), padded to ``max_length``
so a feature's loss does not depend on its batch (the start/end softmax runs over every position). A feature
is labelled with the token span of the first gold answer, or the [CLS] index when the answer is not wholly
inside its window. The loss is HF's ``(CE(start) + CE(end)) / 2``, a mean over features.

Evaluation: for every example, the best-scoring span start_logit[s] + end_logit[e] over all its features
among the ``n_best`` largest start and end logits, with s <= e, e - s + 1 <= ``max_answer_length`` and both
in the context, mapped back to context characters through the offsets; then the official v1.1 scores
against every gold answer (the maximum over them): EM = [normalize(pred) == normalize(gold)] and token F1,
where normalize lower-cases, removes punctuation and the articles a/an/the, and collapses whitespace. Scores
are fractions in [0, 1] (the official script prints percentages).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import QBHError
from .base import RawTask, Task, hub_dataset, read_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASK_NAMES = ("squad", "squad-local", "squad-full")
LOCAL_ONLY = ("squad-local", "squad-full")  # task names that read --data only
RECONSTRUCTED_ID = "recon-"  # question ids of a reconstructed train file: fine to train on, never scored
LABEL_NAMES = ["start", "end"]  # the QA head's two outputs (num_labels = 2)
N_BEST = 20
MAX_ANSWER_LENGTH = 30
TOKENIZE_CHUNK = 4096  # examples tokenized at a time (bounds the memory of a whole train split's features)

Example = tuple[str, str, dict[str, list[Any]]]  # (question, context, {"text": [...], "answer_start": [...]})


# ------------------------------------------------------------------------------------------------ reading


def _fail(path: Path, where: str, problem: str) -> QBHError:
    return QBHError(f"'{path}' {where}: {problem}; fix the file (official SQuAD v1.1 format)")


def _paragraph_examples(path: Path, where: str, paragraph: Any, *, scored: bool = False) -> list[Example]:
    if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
        raise _fail(path, where, "a paragraph without a 'context' string")
    if not isinstance(paragraph.get("qas"), list):
        raise _fail(path, where, "a paragraph without a 'qas' list")
    context, out = paragraph["context"], []
    for qa in paragraph["qas"]:
        qid = qa.get("id", "?") if isinstance(qa, dict) else "?"
        answers = qa.get("answers") if isinstance(qa, dict) else None
        if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not answers:
            raise _fail(path, f"question {qid}", "needs a 'question' and at least one answer (SQuAD v2 is not read)")
        if scored and str(qid).startswith(RECONSTRUCTED_ID):
            raise QBHError(
                f"'{path}' question {qid} has a reconstructed id: a dev file is scored and must be official data, "
                "not a reconstruction; put the official dev-v1.1.json there"
            )
        texts, starts = [], []
        for a in answers:
            text, start = (a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (None, None)
            if not isinstance(text, str) or not text.strip():
                raise _fail(
                    path, f"question {qid}", f"an answer's text is {text!r}; every answer needs a non-empty text"
                )
            if not isinstance(start, int) or isinstance(start, bool):
                raise _fail(path, f"question {qid}", f"answer_start {start!r} is not an integer (a character offset)")
            if start < 0 or context[start : start + len(text)] != text:
                raise _fail(path, f"question {qid}", f"answer_start {start} does not point at the answer {text!r}")
            texts.append(text)
            starts.append(start)
        out.append((qa["question"], context, {"text": texts, "answer_start": starts}))
    return out


def read_squad(path: Path, *, scored: bool = False) -> list[list[Example]]:
    """The examples of an official SQuAD v1.1 file, one list per article (in file order).

    Args:
        path: the JSON file.
        scored: the file is a dev file (scored): question ids of a reconstruction (``recon-...``) are refused.

    Raises:
        QBHError: invalid JSON, a missing ``data``/``paragraphs``/``qas``, or an answer whose ``answer_start``
            does not point at its text; the message names the file and the question id.
    """
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise QBHError(f"'{path}' is not valid JSON ({exc.msg}, line {exc.lineno}); fix the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list) or not data["data"]:
        raise _fail(path, "top level", "no 'data' list of articles")
    articles = []
    for i, article in enumerate(data["data"]):
        where = f"article {i} ({article.get('title', '?')})" if isinstance(article, dict) else f"article {i}"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise _fail(path, where, "no 'paragraphs' list")
        articles.append(
            [ex for p in article["paragraphs"] for ex in _paragraph_examples(path, where, p, scored=scored)]
        )
    return articles


def _one(data_dir: Path, pattern: str) -> Path:
    found = sorted(data_dir.glob(pattern))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise QBHError(f"'{data_dir}' holds {what} {pattern} files; keep exactly one train*.json and one dev*.json")
    return found[0]


def _raw(name: str, train: Sequence[Example], dev: Sequence[Example]) -> RawTask:
    return RawTask(
        name,
        [[q for q, _, _ in train], [c for _, c, _ in train]],
        [a for _, _, a in train],
        [[q for q, _, _ in dev], [c for _, c, _ in dev]],
        [a for _, _, a in dev],
        list(LABEL_NAMES),
        family="qa",
    )


def local_split(train: list[list[Example]], dev: list[list[Example]]) -> tuple[list[Example], list[Example]]:
    """``squad-local``: train articles + the first half of the dev articles, and the second half of dev."""
    half = len(dev) // 2
    return [ex for art in [*train, *dev[:half]] for ex in art], [ex for art in dev[half:] for ex in art]


def _hub(name: str) -> RawTask:
    ds = hub_dataset(
        name, "squad", local="pass --data DIR holding train*.json and dev*.json (SQuAD v1.1), or --task squad-local"
    )

    def examples(split: str) -> list[Example]:
        rows = ds[split]
        return [
            (q, c, {"text": list(a["text"]), "answer_start": list(a["answer_start"])})
            for q, c, a in zip(rows["question"], rows["context"], rows["answers"])
        ]

    return _raw(name, examples("train"), examples("validation"))


def load_qa(name: str, *, data_dir: Path | str | None = None) -> RawTask:
    """Read a SQuAD task; see the module docstring for ``squad``, ``squad-local`` and ``squad-full``."""
    name = name.lower()
    local = name == "squad-local"
    if data_dir is None:
        if name in LOCAL_ONLY:
            where = " (../shared/data/squad-full)" if name == "squad-full" else ""
            raise QBHError(f"task '{name}' reads local files; pass --data DIR with train*.json and dev*.json{where}")
        return _hub(name)
    data = Path(data_dir)
    if not data.is_dir():
        raise QBHError(f"data folder '{data}' does not exist; pass a folder holding train*.json and dev*.json")
    train_path, dev_path = _one(data, "train*.json"), _one(data, "dev*.json")
    train, dev = read_squad(train_path), read_squad(dev_path, scored=True)
    if local:
        return _raw(name, *local_split(train, dev))
    return _raw(name, [ex for art in train for ex in art], [ex for art in dev for ex in art])


# ----------------------------------------------------------------------------------------------- features


def answer_span(offsets: Sequence[Any], sequence_ids: Sequence[int | None], start: int, end: int) -> tuple[int, int]:
    """Token span (s, e) of the characters [start, end) inside the context tokens; (-1, -1) when not inside.

    s is the last context token starting at or before ``start``, e the first one ending at or after ``end``.
    """
    ctx = [k for k, s in enumerate(sequence_ids) if s == 1]
    if not ctx or offsets[ctx[0]][0] > start or offsets[ctx[-1]][1] < end:
        return -1, -1
    s = max(k for k in ctx if offsets[k][0] <= start)
    e = min(k for k in ctx if offsets[k][1] >= end)
    return s, e


def prepare_features(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    contexts: Sequence[str],
    answers: Sequence[dict[str, list[Any]]],
    *,
    max_length: int,
    stride: int,
) -> dict[str, list[Any]]:
    """Windows over each context with the first answer's token span (CLS when outside), offsets (None off
    the context) and the example each feature came from."""
    questions = [q.lstrip() for q in questions]  # leading spaces waste window room (run_qa does the same)
    _check_room(tokenizer, questions, max_length=max_length, stride=stride)
    try:
        enc = tokenizer(
            questions,
            list(contexts),
            truncation="only_second",
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="max_length",
        )
    except Exception as exc:  # noqa: BLE001  (the Rust tokenizer raises plain Exceptions)
        first = str(exc).strip().splitlines()[0][:200]
        raise QBHError(
            f"cannot cut the contexts into windows of {max_length} tokens with stride {stride} ({first}); "
            "raise --max-length (384 is usual) or lower the stride"
        ) from None
    samples = enc.pop("overflow_to_sample_mapping")
    starts, ends, offsets = [], [], []
    for i, offs in enumerate(enc.pop("offset_mapping")):
        seq = enc.sequence_ids(i)
        cls = enc["input_ids"][i].index(tokenizer.cls_token_id) if tokenizer.cls_token_id in enc["input_ids"][i] else 0
        gold = answers[samples[i]]
        first = gold["answer_start"][0]
        s, e = answer_span(offs, seq, first, first + len(gold["text"][0]))
        starts.append(cls if s < 0 else s)
        ends.append(cls if s < 0 else e)
        offsets.append([o if seq[k] == 1 else None for k, o in enumerate(offs)])
    return {
        **enc,
        "start_positions": starts,
        "end_positions": ends,
        "offset_mapping": offsets,
        "example_index": list(samples),
    }


def _check_room(tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *, max_length: int, stride: int) -> None:
    """Every window must hold more context tokens than ``stride`` beside its question, or the Rust tokenizer
    panics (an error that is no ``Exception`` and prints a backtrace): refuse such a length first."""
    if not questions:
        return
    lengths = [len(ids) for ids in tokenizer(list(questions), add_special_tokens=False)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    room = max_length - lengths[longest] - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= stride:
        raise QBHError(
            f"--max-length {max_length} is too short for question {questions[longest][:60]!r} ({lengths[longest]} "
            f"tokens): it leaves {max(room, 0)} context tokens per window, not more than the stride {stride}; raise "
            "--max-length (384 is usual)"
        )


def tokenize_qa(
    raw: RawTask,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 384,
    stride: int | None = None,
    chunk: int = TOKENIZE_CHUNK,
) -> Task:
    """Features of both splits (see :func:`prepare_features`), ``chunk`` examples at a time (the result does not
    depend on it); ``stride`` defaults to ``max_length // 3``."""
    from datasets import Dataset, concatenate_datasets

    if not tokenizer.is_fast:
        raise QBHError("question answering needs a fast tokenizer (offset mapping); load one with use_fast=True")
    stride = max_length // 3 if stride is None else stride
    if not 0 <= stride < max_length:
        raise QBHError(f"stride {stride} must lie in [0, max_length={max_length}); lower it")
    if chunk < 1:
        raise QBHError(f"chunk {chunk} must be at least 1")

    def encode(texts: list[list[str]], answers: list[dict[str, list[Any]]]) -> Dataset:
        # In chunks of examples: the features of all of SQuAD's train split as Python lists (offsets included)
        # take ~10 GB before they become Arrow; chunk by chunk the peak is one chunk's. Same rows, same order.
        parts = []
        for lo in range(0, max(len(answers), 1), chunk):
            hi = lo + chunk
            feats = prepare_features(
                tokenizer, texts[0][lo:hi], texts[1][lo:hi], answers[lo:hi], max_length=max_length, stride=stride
            )
            feats["example_index"] = [lo + i for i in feats["example_index"]]
            parts.append(Dataset.from_dict(feats))
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

    return Task(
        raw.name,
        encode(raw.train_texts, raw.train_labels),
        encode(raw.dev_texts, raw.dev_labels),
        raw.label_names,
        tokenizer,
        max_length,
        family="qa",
        raw=raw,
    )


# ------------------------------------------------------------------------------------------ post-processing


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    example_index: Sequence[int],
    offsets: Sequence[Sequence[Any]],
    contexts: Sequence[str],
    *,
    n_best: int = N_BEST,
    max_answer_length: int = MAX_ANSWER_LENGTH,
) -> list[str]:
    """The predicted answer text of every example: the best valid span over all of its features.

    Args:
        start_logits: (features, width); positions past a feature's own length are ignored.
        end_logits: (features, width).
        example_index: the example of each feature.
        offsets: per feature, (char start, char end) per token, None off the context.
        contexts: the examples' contexts.
    """
    best: list[tuple[float, str]] = [(-np.inf, "")] * len(contexts)
    for f, ex in enumerate(example_index):
        offs = offsets[f]
        s_log, e_log = np.asarray(start_logits[f][: len(offs)]), np.asarray(end_logits[f][: len(offs)])
        top_s = np.argsort(s_log)[::-1][:n_best]
        top_e = np.argsort(e_log)[::-1][:n_best]
        for s in top_s:
            for e in top_e:
                if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_log[s] + e_log[e])
                if score > best[ex][0]:
                    best[ex] = (score, contexts[ex][offs[s][0] : offs[e][1]])
    return [text for _, text in best]


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall of the normalised texts (bag of tokens)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean over examples of the best EM and F1 against any gold answer (fractions in [0, 1])."""
    em = [max(exact_match(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    f1 = [max(token_f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1)), "num_examples": len(golds)}


def qa_scores(task: Task, split: str, predictions: Any, label_ids: Any) -> dict[str, float]:
    """EM and F1 of a split from (start, end) logits stacked over its features in order."""
    if task.raw is None:
        raise QBHError("QA scores need the task's examples; build the task with tokenize_task")
    features = task.dev if split == "dev" else task.train
    texts = task.raw.dev_texts if split == "dev" else task.raw.train_texts
    answers = task.raw.dev_labels if split == "dev" else task.raw.train_labels
    start, end = predictions
    spans = best_spans(start, end, list(features["example_index"]), list(features["offset_mapping"]), texts[1])
    return squad_metrics(spans, [a["text"] for a in answers])
