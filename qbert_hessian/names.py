"""Canonical block names, the same in reports, plans, plots and errors whatever the model family.

``embeddings`` (the whole embedding module), its parts ``embeddings.word|position|token_type``,
``encoder.{i}`` (all parameters of encoder layer i, as Q-BERT scores them) and, inside a layer,
``encoder.{i}.query|key|value|attn_out|ffn_in|ffn_out``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import QBHError

EMBEDDING_PARTS: tuple[str, ...] = ("word", "position", "token_type")
LINEAR_PARTS: tuple[str, ...] = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")

# Named groups a user may pass instead of listing blocks one by one.
BLOCK_GROUPS: dict[str, str] = {
    "default": "embeddings and every encoder layer (Q-BERT's blocks)",
    "layers": "every encoder layer",
    "embedding-parts": "embeddings.word, embeddings.position and embeddings.token_type",
    "linears": "every linear module of every encoder layer (encoder.i.query ... encoder.i.ffn_out)",
}


def layer_blocks(num_layers: int) -> list[str]:
    """``encoder.0`` ... ``encoder.{L-1}``."""
    return [f"encoder.{i}" for i in range(num_layers)]


def default_blocks(num_layers: int) -> list[str]:
    """Q-BERT's blocks: the embedding table and every encoder layer."""
    return ["embeddings", *layer_blocks(num_layers)]


def all_blocks(num_layers: int, embedding_parts: Iterable[str] = EMBEDDING_PARTS) -> list[str]:
    """Every valid block name of a model with ``num_layers`` layers and the given embedding parts."""
    names = ["embeddings", *(f"embeddings.{p}" for p in embedding_parts)]
    for i in range(num_layers):
        names.append(f"encoder.{i}")
        names.extend(f"encoder.{i}.{part}" for part in LINEAR_PARTS)
    return names


def validate_block(name: str, num_layers: int, embedding_parts: Sequence[str] = EMBEDDING_PARTS) -> str:
    """Return ``name`` if it is a block of this model, else raise a :class:`QBHError` naming the valid ones."""
    if name in all_blocks(num_layers, embedding_parts):
        return name
    parts = name.split(".")
    if parts[0] == "encoder" and len(parts) >= 2 and parts[1].isdigit():
        if int(parts[1]) >= num_layers:
            raise QBHError(f"block '{name}' does not exist; this model has encoder.0..encoder.{num_layers - 1}")
        raise QBHError(
            f"block '{name}' does not exist; inside a layer the blocks are "
            f"{', '.join(LINEAR_PARTS)} (e.g. encoder.{parts[1]}.query)"
        )
    if parts[0] == "embeddings":
        raise QBHError(
            f"block '{name}' does not exist; this model's embedding blocks are embeddings, "
            + ", ".join(f"embeddings.{p}" for p in embedding_parts)
        )
    raise QBHError(
        f"block '{name}' does not exist; blocks are embeddings[.word|.position|.token_type], "
        f"encoder.0..encoder.{num_layers - 1}[.query|.key|.value|.attn_out|.ffn_in|.ffn_out], "
        f"or a group: {', '.join(BLOCK_GROUPS)}"
    )


def expand_blocks(
    spec: Sequence[str] | None, num_layers: int, embedding_parts: Sequence[str] = EMBEDDING_PARTS
) -> list[str]:
    """Expand block names and groups (``default``, ``layers``, ``embedding-parts``, ``linears``) in order.

    Duplicates are dropped; ``None`` or an empty spec means ``default``.
    """
    out: list[str] = []
    for item in spec or ["default"]:
        item = item.strip()
        if item == "default":
            names = default_blocks(num_layers)
        elif item == "layers":
            names = layer_blocks(num_layers)
        elif item == "embedding-parts":
            names = [f"embeddings.{p}" for p in embedding_parts]
        elif item == "linears":
            names = [f"encoder.{i}.{p}" for i in range(num_layers) for p in LINEAR_PARTS]
        else:
            names = [validate_block(item, num_layers, embedding_parts)]
        out.extend(n for n in names if n not in out)
    return out


def blocks_overlap(a: str, b: str) -> bool:
    """True when one block contains the other (``encoder.3`` and ``encoder.3.query``) or they are equal."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")
