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


def shared_data_dir() -> Path | None:
    """../shared/data beside the repository (CI puts it there), or None."""
    d = Path(__file__).resolve().parents[2] / "shared" / "data"
    return d if d.is_dir() else None
