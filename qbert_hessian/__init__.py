"""qbert_hessian: Hessian-guided ultra-low-bit compression of BERT-family models.

The public API is re-exported lazily (PEP 562), so ``import qbert_hessian.cli`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .artifacts import __version__

_EXPORTS = {
    "QBHError": "errors",
    "SensitivityConfig": "config",
    "FinetuneConfig": "config",
    "TraceMode": "config",
    "SensitivityReport": "artifacts",
    "BlockSensitivity": "artifacts",
    "load_model": "models",
    "BlockMap": "models",
    "load_task": "tasks",
    "load_raw_task": "tasks",
    "BlockHessian": "hessian.hvp",
    "top_eigenvalues": "hessian.eigen",
    "most_negative_eigenvalue": "hessian.eigen",
    "hutchinson_trace": "hessian.trace",
    "hutchinson_block_traces": "hessian.trace",
    "estimate_sensitivity": "hessian.sensitivity",
    "finetune": "train",
    "write_sensitivity": "report",
    "BitPlan": "artifacts",
    "Budget": "allocate",
    "AllocConfig": "allocate",
    "allocate_bits": "allocate",
    "uniform_plan": "allocate",
    "frontier": "allocate",
    "QuantSpec": "quant.functional",
    "quantize_model": "quant.apply",
    "calibrate_activations": "quant.apply",
    "quant_profile": "quant.apply",
    "QuantLinear": "quant.modules",
    "QuantEmbedding": "quant.modules",
    "save_packed": "export",
    "load_packed": "export",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qbert_hessian' has no attribute '{name}'")
