"""Shared test helpers: exact references and tiny offline checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

WORDS = (
    "the a movie film is was good bad great awful boring fun plot actor story love hate not very "
    "funny dull smart slow fast best worst ever never really quite"
).split()


def dense_block_hessian(
    model: nn.Module, params: Sequence[nn.Parameter], batch: dict, *, forward_mode: bool = True
) -> torch.Tensor:
    """The exact Hessian of ``model(**batch).loss`` w.r.t. the flattened ``params`` (others held fixed).

    ``forward_mode=False`` differentiates twice in reverse mode (row by row), as training does: an
    ``nn.Embedding`` ``padding_idx`` row gets no reverse-mode gradient, while forward mode differentiates it;
    that differs where padding reaches the loss, as in QA.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    base = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        values = dict(base)
        for k, piece, shape in zip(keys, pieces, shapes):
            values[k] = piece.view(shape)
        return torch.func.functional_call(model, values, args=(), kwargs=batch).loss

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    # Forward-over-reverse, vectorised: ~30x faster than the default row-by-row reverse mode here.
    if not forward_mode:
        return torch.autograd.functional.hessian(loss_of, flat).detach()
    H = torch.autograd.functional.hessian(loss_of, flat, vectorize=True, outer_jacobian_strategy="forward-mode")
    return H.detach()


def random_batch(
    vocab_size: int, batch_size: int = 6, seq_len: int = 7, num_labels: int = 2, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(input_ids)
    mask[0, -2:] = 0  # one padded row exercises the attention mask
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.randint(0, num_labels, (batch_size,), generator=g),
    }


def write_vocab(path: Path) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path.write_text("\n".join(specials + WORDS) + "\n", encoding="utf-8")
    return path


def make_tiny_checkpoint(
    out: Path, *, num_labels: int = 2, seed: int = 0, hidden: int = 16, layers: int = 2, heads: int = 4
) -> Path:
    """A saved tiny BERT classifier with its own WordPiece tokenizer (no download)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(out / "vocab.txt")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden + 5,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_tsv(path: Path, n: int, seed: int = 0, header: str = "sentence\tlabel") -> Path:
    """A GLUE-style TSV of ``n`` random sentences over WORDS with 0/1 labels (label = 'good' in sentence)."""
    g = torch.Generator().manual_seed(seed)
    lines = [header]
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        words = [WORDS[i] for i in idx]
        lines.append(f"{' '.join(words)} \t{int('good' in words or 'great' in words)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


TAGGED = {"good": "B-POS", "great": "B-POS", "fun": "B-POS", "bad": "B-NEG", "awful": "B-NEG", "boring": "B-NEG"}


def conll_lines(n: int, seed: int) -> str:
    """A CoNLL-03 file of ``n`` random sentences over WORDS (4 columns, IOB2 tags by :data:`TAGGED`)."""
    import random

    rng = random.Random(seed)
    out = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(n):
        for w in rng.choices(WORDS, k=rng.randint(3, 8)):
            tag = TAGGED.get(w, "O")
            out.append(f"{w} NN O {tag}")
        out.append("")
    return "\n".join(out) + "\n"


def squad_file(n_articles: int, seed: int) -> dict:
    """A SQuAD v1.1 file of ``n_articles`` random 30-word contexts with 3 questions each (2-word answers)."""
    import random

    rng = random.Random(seed)
    data = []
    for a in range(n_articles):
        context = " ".join(rng.choices(WORDS, k=30))
        qas = []
        for q in range(3):
            words = context.split()
            i = rng.randrange(len(words) - 2)
            answer = " ".join(words[i : i + 2])
            start = len(" ".join(words[:i])) + (1 if i else 0)
            qas.append(
                {
                    "id": f"{a}-{q}",
                    "question": "what is " + words[i],
                    "answers": [{"text": answer, "answer_start": start}],
                }
            )
        data.append({"title": f"t{a}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": data}


def write_ner_dir(d: Path, *, train: int = 48, dev: int = 12) -> Path:
    """A CoNLL-03 folder (``train.txt``, ``valid.txt``) for ``--task conll03 --data d``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.txt").write_text(conll_lines(train, 0))
    (d / "valid.txt").write_text(conll_lines(dev, 1))
    return d


def write_squad_dir(d: Path, *, train: int = 6, dev: int = 4) -> Path:
    """A SQuAD v1.1 folder (``train-v1.1.json``, ``dev-v1.1.json``) of that many articles, for ``--task squad``."""
    import json

    d.mkdir(parents=True, exist_ok=True)
    (d / "train-v1.1.json").write_text(json.dumps(squad_file(train, 0)))
    (d / "dev-v1.1.json").write_text(json.dumps(squad_file(dev, 1)))
    return d


MNLI_HEADER = "idx\tpairID\tpremise\thypothesis\tlabel"


def mnli_lines(n: int, seed: int) -> list[str]:
    """Rows of an MNLI dev file in the shared data's compact columns, labels cycling through GLUE's three names."""
    g = torch.Generator().manual_seed(seed)
    labels = ("entailment", "neutral", "contradiction")
    lines = [MNLI_HEADER]
    for i in range(n):
        premise, hypothesis = (
            " ".join(WORDS[int(k)] for k in torch.randint(0, len(WORDS), (int(m),), generator=g)) for m in (6, 3)
        )
        lines.append(f"{i}\t{seed}{i:04d}e\t{premise} \t{hypothesis}\t{labels[(i + seed) % 3]}")
    return lines


def write_mnli_dir(d: Path, *, matched: int = 30, mismatched: int = 36) -> Path:
    """A folder like ``shared/data/mnli`` (``dev_matched.tsv``, ``dev_mismatched.tsv``) for ``--task mnli-local``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "dev_matched.tsv").write_text("\n".join(mnli_lines(matched, 0)) + "\n", encoding="utf-8")
    (d / "dev_mismatched.tsv").write_text("\n".join(mnli_lines(mismatched, 1)) + "\n", encoding="utf-8")
    return d


def shared_data_dir() -> Path | None:
    """../shared/data beside the repository (CI puts it there), or None."""
    d = Path(__file__).resolve().parents[2] / "shared" / "data"
    return d if d.is_dir() else None


# The [model] and [sensitivity] tables of a run on the tiny model and data (format with model=, data=); the run
# tests add their own [allocate], [qat], [run] and [[plans]].
TINY_RUN_HEAD = """
[model]
name = "{model}"
task = "sst2"
data = "{data}"
max_length = 16

[sensitivity]
draws = 2
batch_size = 8
max_iters = 10
trace_samples = 2
"""
