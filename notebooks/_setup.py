"""What every notebook needs first: the real MiniLM-L6 artifacts, or with QBH_TINY=1 a tiny random BERT and toy
data built on the spot (that is how the test suite runs the notebooks, in seconds).

The real artifacts come from ``qbert-hessian run experiments/sst2_minilm.toml`` (folder runs/sst2_minilm).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = os.environ.get("QBH_TINY", "0") == "1"
WORDS = "the a movie film is was good bad great awful boring fun plot actor story love hate not very dull".split()


def _tiny() -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = Path(tempfile.mkdtemp(prefix="qbh-notebook-"))
    ckpt, data = root / "checkpoint", root / "data"
    ckpt.mkdir()
    data.mkdir()
    (ckpt / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(ckpt / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    rng = random.Random(0)
    for split, n in (("train", 128), ("dev", 32)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            words = rng.choices(WORDS, k=rng.randint(3, 8))
            rows.append(f"{' '.join(words)}\t{int('good' in words or 'great' in words)}")
        (data / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return {
        "model": str(ckpt),
        "task": "sst2",
        "data": str(data),
        "max_length": 16,
        "groups": "heads",
        "run_dir": root / "run",
        "batch_size": 16,
        "tiny": True,
    }


def _relative(path: Path) -> Path:
    """``path`` relative to the working directory (the notebooks' folder), so outputs hold no machine paths."""
    return Path(os.path.relpath(path))


def _real() -> dict:
    run = _relative(ROOT / "runs" / "sst2_minilm")
    if not (run / "checkpoint" / "metrics.json").exists():
        raise FileNotFoundError(
            f"{run} has no fine-tuned checkpoint; run `qbert-hessian run experiments/sst2_minilm.toml` first "
            "(or set QBH_TINY=1 for the tiny model)"
        )
    return {
        "model": str(run / "checkpoint"),
        "task": "sst2",
        "data": str(_relative(ROOT.parent / "shared" / "data" / "sst2")),
        "max_length": 64,
        "groups": 128,
        "run_dir": run,
        "batch_size": 32,
        "tiny": False,
    }


def workspace() -> dict:
    """Paths and settings of the chosen mode."""
    return _tiny() if TINY else _real()
