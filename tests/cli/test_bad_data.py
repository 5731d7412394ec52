"""Bad data, as test_bad_inputs.py's table has it (the command, the exit code, a fragment of the one-line
message, and the whole workspace compared before and after): label names against a trained head, NER tags,
QA answers, pair columns, lengths too short for the data. Silent wrong answers are tested for refusal or for
the right number (the same data scores the same however its labels are written), never for a warning.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qbert_hessian.cli import main
from tests.cli.test_bad_inputs import RUN_TOML, Case, check_case
from tests.helpers import make_tiny_checkpoint, write_ner_dir, write_squad_dir, write_tsv

SENTIMENT = ["negative", "positive"]
NER_TAGS = ["B-NEG", "B-POS", "O"]  # write_ner_dir's tags, sorted


def head_checkpoint(out: Path, family: str, id2label: list[str] | None, *, seed: int = 0) -> Path:
    """A tiny BERT with a trained-looking head of ``family`` (random weights) whose config names ``id2label``."""
    import transformers as tf

    base = make_tiny_checkpoint(out, num_labels=len(id2label or ["start", "end"]), seed=seed)
    config = tf.AutoConfig.from_pretrained(base)
    if id2label is not None:
        config.id2label = dict(enumerate(id2label))
        config.label2id = {n: i for i, n in enumerate(id2label)}
    cls = {"classification": "ForSequenceClassification", "token": "ForTokenClassification"}.get(
        family, "ForQuestionAnswering"
    )
    torch.manual_seed(seed)
    model = getattr(tf, f"Bert{cls}")(config)
    model.config.architectures = [f"Bert{cls}"]
    model.save_pretrained(out)
    return out


def swapped_head(src: Path, out: Path) -> Path:
    """``src`` with its two classes' rows and names swapped: the same function, the other label order."""
    import transformers as tf

    shutil.copytree(src, out)
    model = tf.AutoModelForSequenceClassification.from_pretrained(src)
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    names = [model.config.id2label[i] for i in range(2)][::-1]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    model.save_pretrained(out)
    return out


@dataclasses.dataclass
class World:
    root: Path
    ckpt: Path  # 2 classes, transformers' placeholder names (LABEL_0, LABEL_1)
    named: Path  # 2 classes named negative, positive
    tagger: Path  # a token head naming NER_TAGS
    reader: Path  # a QA head
    packed: Path  # `named`, packed
    data: Path  # integer labels


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from transformers import AutoModelForSequenceClassification

    from qbert_hessian.artifacts import BitPlan
    from qbert_hessian.export import save_packed
    from qbert_hessian.quant.apply import quantize_model

    root = tmp_path_factory.mktemp("data_world")
    named = head_checkpoint(root / "named", "classification", SENTIMENT)
    packed = root / "packed"
    model = AutoModelForSequenceClassification.from_pretrained(named).eval()
    plan = BitPlan(model={}, blocks={"encoder.0": {"bits": 4, "groups": 1}}, act_bits=None)
    save_packed(quantize_model(model, plan), packed, plan=plan)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (named / f).exists() and not (packed / f).exists():
            shutil.copy2(named / f, packed / f)
    data = root / "data"
    write_tsv(data / "train.tsv", 48, seed=0)
    write_tsv(data / "dev.tsv", 16, seed=1)
    return World(
        root=root,
        ckpt=make_tiny_checkpoint(root / "ckpt"),
        named=named,
        tagger=head_checkpoint(root / "tagger", "token", NER_TAGS),
        reader=head_checkpoint(root / "reader", "qa", None),
        packed=packed,
        data=data,
    )


# --------------------------------------------------------------------------------------------- case builders


def _evaluate(model: Path, task: str, data: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--task", task, "--data", str(data), "--max-length", "32", "--quiet",
            *extra]  # fmt: skip


def _labelled(tmp: Path, labels: Callable[[int], str], *, names: str | None = None, header: str = "label") -> Path:
    """write_tsv's sentences with labels ``labels(y)`` for its 0/1 labels, and ``labels.txt`` holding ``names``."""
    d = tmp / "labelled"
    for split, n, seed in (("train", 48, 0), ("dev", 16, 1)):
        path = write_tsv(d / f"{split}.tsv", n, seed=seed)
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [line.rsplit("\t", 1) for line in lines[1:]]
        path.write_text("\n".join([f"sentence\t{header}", *[f"{s}\t{labels(int(y))}" for s, y in rows]]) + "\n")
    if names is not None:
        (d / "labels.txt").write_text(names, encoding="utf-8")
    return d


def _ner_edit(tmp: Path, edit: Callable[[str], str], *, which: tuple[str, ...] = ("train.txt", "valid.txt")) -> Path:
    d = write_ner_dir(tmp / "ner")
    for name in which:
        (d / name).write_text(edit((d / name).read_text()))
    return d


def _ner_jsonl(tmp: Path, tag: Callable[[str], object], names: str | None = None) -> Path:
    """write_ner_dir's sentences as JSONL with tags ``tag(name)``, and ``labels.txt`` holding ``names``."""
    from qbert_hessian.tasks.token import read_conll

    src = write_ner_dir(tmp / "src")
    d = tmp / "ner_jsonl"
    d.mkdir()
    for conll, jsonl in (("train.txt", "train.jsonl"), ("valid.txt", "dev.jsonl")):
        words, tags = read_conll(src / conll)
        lines = [json.dumps({"tokens": w, "tags": [tag(t) for t in ts]}) for w, ts in zip(words, tags)]
        (d / jsonl).write_text("\n".join(lines) + "\n")
    if names is not None:
        (d / "labels.txt").write_text(names)
    return d


def _answer(tmp: Path, edit: Callable[[dict, str], None]) -> Path:
    d = write_squad_dir(tmp / "squad")
    data = json.loads((d / "dev-v1.1.json").read_text())
    paragraph = data["data"][0]["paragraphs"][0]
    edit(paragraph["qas"][0]["answers"][0], paragraph["context"])
    (d / "dev-v1.1.json").write_text(json.dumps(data))
    return d


def _negative_start(answer: dict, context: str) -> None:
    answer["answer_start"] -= len(context)  # points at the same text from the end: context[-k:-k+len]
    assert context[answer["answer_start"] : answer["answer_start"] + len(answer["text"])] == answer["text"]


def _long_question(tmp: Path) -> Path:
    d = write_squad_dir(tmp / "squad")
    data = json.loads((d / "dev-v1.1.json").read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["question"] = " ".join(["what is the movie"] * 6)
    (d / "dev-v1.1.json").write_text(json.dumps(data))
    return d


def _edited_config(src: Path, dst: Path, num_labels: int) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _three_columns(tmp: Path) -> list[str]:
    d = tmp / "pairs"
    d.mkdir()
    for split, n in (("train", 12), ("dev", 4)):
        rows = ["a\tb\tc\tlabel", *[f"good movie\tfun\tplot\t{i % 2}" for i in range(n)]]
        (d / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return ["--text-columns", "a,b,c", "--label-column", "label"], d


def _empty_sentences(tmp: Path) -> Path:
    d = tmp / "empty"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f" \t{i % 2}\n" for i in range(20)))
    write_tsv(d / "dev.tsv", 8, seed=1)
    return d


def _finetune(w: World, tmp: Path, task: str, data: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(w.ckpt), "--task", task, "--data", str(data), "--max-length", "32",
            "--epochs", "1", "--out", str(tmp / "ft"), "--quiet", *extra]  # fmt: skip


def _columns3(w: World, tmp: Path) -> list[str]:
    extra, d = _three_columns(tmp)
    return _evaluate(w.ckpt, "sst2", d, *extra)


CASES = [
    # label names against a trained head
    Case(
        "labels-integers-against-named-head",
        lambda w, t: _evaluate(w.named, "sst2", w.data),
        "the data's labels are integers without names, while model",
    ),
    Case(
        "labels-names-differ-from-head",
        lambda w, t: _evaluate(w.named, "sst2", _labelled(t, lambda y: ["bad", "good"][y])),
        "the data's labels (0=bad, 1=good) are not model",
    ),
    Case(
        "labels-integers-against-named-packed-head",
        lambda w, t: _evaluate(w.packed, "sst2", w.data),
        "the data's labels are integers without names",
    ),
    Case(
        "labels-integers-against-named-head-sensitivity",
        lambda w, t: ["sensitivity", *_evaluate(w.named, "sst2", w.data)[1:], "--draws", "1", "--out", str(t / "o")],
        "the data's labels are integers without names",
    ),
    Case(
        "labels-integers-against-named-head-run",
        lambda w, t: _run(w, t, w.named),
        "the data's labels are integers without names",
    ),
    Case(
        "labels-txt-too-few-names",
        lambda w, t: _evaluate(w.named, "sst2", _labelled(t, lambda y: str(y + 1), names="negative\npositive\n")),
        "label 2 of",
    ),
    Case(
        "labels-txt-misses-a-string-label",
        lambda w, t: _evaluate(w.named, "sst2", _labelled(t, lambda y: SENTIMENT[y], names="negative\nneutral\n")),
        "label 'positive' of",
    ),
    Case(
        "labels-txt-blank-line",
        lambda w, t: _evaluate(w.named, "sst2", _labelled(t, str, names="negative\n\npositive\n")),
        "one label per line",
    ),
    Case(
        "labels-txt-twice",
        lambda w, t: _evaluate(w.named, "sst2", _labelled(t, str, names="negative\nnegative\n")),
        "names negative more than once",
    ),
    Case(
        "ner-tags-differ-from-head",
        lambda w, t: _evaluate(w.tagger, "conll03", _ner_edit(t, lambda s: s.replace("B-POS", "B-PER"))),
        "the data's tags (0=B-NEG, 1=B-PER, 2=O) are not model",
    ),
    # NER tags that are not IOB strings
    Case(
        "ner-integer-tags-without-names",
        lambda w, t: _evaluate(w.tagger, "ner", _ner_jsonl(t, NER_TAGS.index)),
        "are integers (0, 1, 2 ...) without names; write the tag names in labels.txt",
    ),
    Case(
        "ner-integer-tags-in-conll-columns",
        lambda w, t: _evaluate(w.tagger, "conll03", _ner_edit(t, lambda s: s.replace("B-POS", "1"))),
        "are integers",
    ),
    Case(
        "ner-lowercase-tags",
        lambda w, t: _evaluate(w.tagger, "conll03", _ner_edit(t, lambda s: s.replace("B-POS", "b-pos"))),
        "tags 'b-pos' of",
    ),
    Case(
        "ner-junk-tags",
        lambda w, t: _evaluate(w.tagger, "conll03", _ner_edit(t, lambda s: s.replace("B-NEG", "NEGATIVE"))),
        "are not IOB/IOB2 tags",
    ),
    Case(
        "ner-labels-txt-not-iob",
        lambda w, t: _evaluate(w.tagger, "ner", _ner_jsonl(t, NER_TAGS.index, names="neg\npos\nO\n")),
        "tags 'neg', 'pos' of",
    ),
    # lengths too short for the data, words the tokenizer drops
    Case(
        "squad-max-length-below-the-question",
        lambda w, t: [*_evaluate(w.reader, "squad", _long_question(t))[:-3], "--max-length", "24", "--quiet"],
        "--max-length 24 is too short for question",
    ),
    Case(
        "ner-dev-words-without-sub-tokens",
        lambda w, t: _evaluate(w.tagger, "conll03", _zero_width_dev(t)),
        "no dev word of task 'conll03' has a sub-token",
    ),
    Case(
        "packed-config-edited-label-count",
        lambda w, t: _evaluate(_edited_config(w.packed, t / "p", 3), "sst2", w.data),
        "has a 3-label head but task 'sst2' has 2 labels",
    ),
    Case(
        "checkpoint-config-edited-label-count",
        lambda w, t: _evaluate(_edited_config(w.ckpt, t / "c", 3), "sst2", w.data),
        "has a trained 3-label head but the task has 2 labels",
    ),
    # QA answers and pair columns
    Case(
        "squad-empty-answer",
        lambda w, t: _evaluate(w.reader, "squad", _answer(t, lambda a, c: a.update(text="", answer_start=0))),
        "an answer's text is ''",
    ),
    Case(
        "squad-negative-answer-start",
        lambda w, t: _evaluate(w.reader, "squad", _answer(t, _negative_start)),
        "does not point at the answer",
    ),
    Case(
        "squad-answer-start-string",
        lambda w, t: _evaluate(
            w.reader, "squad", _answer(t, lambda a, c: a.update(answer_start=str(a["answer_start"])))
        ),
        "is not an integer (a character offset)",
    ),
    Case("text-columns-three", _columns3, "--text-columns takes one column, or two for a sentence pair; got 3"),
    # training data with no text
    Case("train-sentences-all-empty", lambda w, t: _finetune(w, t, "sst2", _empty_sentences(t)), "is empty in all 20"),
    Case(
        "max-eval-samples-zero",
        lambda w, t: _finetune(w, t, "sst2", w.data, "--max-eval-samples", "0"),
        "--max-eval-samples: 0 is not a positive integer",
        usage=True,
    ),
]


def _run(w: World, tmp: Path, model: Path) -> list[str]:
    cfg = tmp / "run.toml"
    cfg.write_text(RUN_TOML.format(model=model, data=w.data), encoding="utf-8")
    return ["run", str(cfg), "--out", str(tmp / "out"), "--quiet"]


def _zero_width_dev(tmp: Path) -> Path:
    d = write_ner_dir(tmp / "ner")
    (d / "valid.txt").write_text("\u200b NN O B-POS\n\u200b NN O O\n\n")
    return d


def test_the_table_has_no_duplicate_ids():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data(case: Case, world: World, tmp_path: Path, capsys):
    check_case(case, world, tmp_path, capsys)


# ------------------------------------------------------------------------------------- the right number


def _scores(argv: list[str], out: Path) -> dict:
    assert main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())["results"][0]


def _same(a: dict, b: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k


def test_label_order_and_form_do_not_change_the_score(world, tmp_path):
    """The same dev data scores the same written as names, as integers named by labels.txt (in either order), and
    against a head that numbers the classes the other way round."""
    words = _labelled(tmp_path / "a", lambda y: SENTIMENT[y])
    ints = _labelled(tmp_path / "b", str, names="negative\npositive\n")
    flipped = _labelled(tmp_path / "c", lambda y: str(1 - y), names="positive\nnegative\n")
    swapped = swapped_head(world.named, tmp_path / "swapped")
    base = _scores(_evaluate(world.named, "sst2", words), tmp_path / "1.json")
    # teeth: numbered alphabetically against the swapped head, every prediction would count the other way
    assert base["accuracy"] != pytest.approx(0.5)
    keys = ("accuracy", "macro_f1", "loss")
    _same(base, _scores(_evaluate(swapped, "sst2", words), tmp_path / "2.json"), keys)
    _same(base, _scores(_evaluate(world.named, "sst2", ints), tmp_path / "3.json"), keys)
    _same(base, _scores(_evaluate(world.named, "sst2", flipped), tmp_path / "4.json"), keys)
    _same(base, _scores(_evaluate(swapped, "sst2", flipped), tmp_path / "5.json"), keys)


def test_tag_order_and_form_do_not_change_the_score(world, tmp_path):
    """CoNLL string tags and JSONL integer tags named by labels.txt in another order score the same."""
    strings = write_ner_dir(tmp_path / "conll")
    order = ["O", "B-POS", "B-NEG"]
    ints = _ner_jsonl(tmp_path, order.index, names="\n".join(order) + "\n")
    base = _scores(_evaluate(world.tagger, "conll03", strings), tmp_path / "1.json")
    other = _scores(_evaluate(world.tagger, "ner", ints), tmp_path / "2.json")
    _same(base, other, ("f1", "precision", "recall", "accuracy", "loss"))


def test_mnli_labels_take_glue_order(tmp_path):
    from qbert_hessian.tasks import load_raw_task

    for split in ("train", "dev"):
        rows = ["premise\thypothesis\tlabel"] + [
            f"a fun movie\tit was {w}\t{label}"
            for w, label in zip(["good", "bad", "fine"], ["contradiction", "entailment", "neutral"])
        ]
        (tmp_path / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    raw = load_raw_task("mnli", data_dir=tmp_path)
    assert raw.label_names == ["entailment", "neutral", "contradiction"]
    assert raw.train_labels == [2, 0, 1] and raw.dev_labels == [2, 0, 1]
    (tmp_path / "labels.txt").write_text("neutral\nentailment\ncontradiction\n")  # labels.txt decides
    assert load_raw_task("mnli", data_dir=tmp_path).train_labels == [2, 1, 0]


@pytest.mark.parametrize("family", ["classification", "token", "qa"])
def test_max_eval_samples_on_every_family(world, tmp_path, family):
    """evaluate and finetune score a seeded subset of the dev split and say so."""
    task, model, data = {
        "classification": ("sst2", world.ckpt, world.data),
        "token": ("conll03", world.tagger, write_ner_dir(tmp_path / "ner")),
        "qa": ("squad", world.reader, write_squad_dir(tmp_path / "squad")),
    }[family]
    row = _scores(_evaluate(model, task, data, "--max-eval-samples", "5", "--seed", "3"), tmp_path / "e.json")
    assert row["num_examples"] == 5 and row["max_eval_samples"] == 5 and row["eval_seed"] == 3
    full = _scores(_evaluate(model, task, data), tmp_path / "full.json")
    assert full["num_examples"] > 5 and "max_eval_samples" not in full
    ft = ["finetune", "--model", str(world.ckpt), "--task", task, "--data", str(data), "--max-length", "32",
          "--epochs", "1", "--max-train-samples", "8", "--max-eval-samples", "3", "--quiet"]  # fmt: skip
    assert main([*ft, "--out", str(tmp_path / "ft")]) == 0
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["metrics"]["num_examples"] == 3 and metrics["max_eval_samples"] == 3 and metrics["eval_seed"] == 0


def test_finetune_keeps_a_trained_heads_order_and_gives_a_fresh_one_the_documented_order(world, tmp_path):
    words = _labelled(tmp_path / "a", lambda y: SENTIMENT[y])
    swapped = swapped_head(world.named, tmp_path / "swapped")
    mnli = _labelled(tmp_path / "b", lambda y: ["contradiction", "entailment"][y])
    (mnli / "dev.tsv").write_text((mnli / "dev.tsv").read_text() + "a movie\tneutral\n")
    (mnli / "train.tsv").write_text((mnli / "train.tsv").read_text() + "a movie\tneutral\n")
    for model, data, want in (
        (swapped, words, ["positive", "negative"]),  # the trained head's meaning is kept
        (world.ckpt, mnli, ["entailment", "neutral", "contradiction"]),  # a fresh head: GLUE's MNLI order
    ):
        out = tmp_path / f"ft-{len(want)}"
        argv = ["finetune", "--model", str(model), "--task", "sst2", "--data", str(data), "--max-length", "16",
                "--epochs", "1", "--max-train-samples", "8", "--quiet", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        config = json.loads((out / "config.json").read_text())
        assert [config["id2label"][str(i)] for i in range(len(want))] == want
