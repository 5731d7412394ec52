"""qbert_hessian: Hessian-guided ultra-low-bit compression of BERT-family models.

The public API is re-exported lazily (PEP 562), so ``import qbert_hessian.cli`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .artifacts import __version__

# The workflow in order (DESIGN.md): load -> fine-tune -> sensitivity -> cost table -> plan -> quantize -> QAT
# -> export -> evaluate -> pictures. Each name maps to the module that defines it.
_EXPORTS = {
    "QBHError": "errors",
    # models and tasks
    "load_model": "models",
    "load_tokenizer": "models",
    "BlockMap": "models",
    "load_task": "tasks",
    "load_raw_task": "tasks",
    "tokenize_task": "tasks",
    "subset": "tasks",
    # fine-tuning
    "FinetuneConfig": "config",
    "finetune": "train",
    # sensitivity
    "SensitivityConfig": "config",
    "TraceMode": "config",
    "TraceMethod": "config",
    "estimate_sensitivity": "sensitivity",
    "SensitivityReport": "artifacts",
    "BlockSensitivity": "artifacts",
    "BlockHessian": "hessian.hvp",
    "top_eigenvalues": "hessian.eigen",
    "most_negative_eigenvalue": "hessian.eigen",
    "hutchinson_trace": "hessian.trace",
    "hutchinson_block_traces": "hessian.trace",
    "hutchpp_trace": "hessian.trace",
    "write_sensitivity": "report",
    # the allocator's cost table and plans
    "measure_profile": "quant.profile",
    "profile_units": "quant.profile",
    "QuantProfile": "artifacts",
    "AllocConfig": "config",
    "Budget": "config",
    "PlanSpec": "config",
    "allocate_bits": "allocate",
    "uniform_plan": "allocate",
    "frontier": "allocate",
    "BitPlan": "artifacts",
    # quantization, QAT, export, evaluation
    "QuantSpec": "quant.functional",
    "quantize_model": "quant.apply",
    "calibrate_activations": "quant.apply",
    "calibration_batches": "quant.apply",
    "quantize_calibrated": "quant.apply",
    "GPTQConfig": "config",
    "gptq_quantize": "quant.gptq",
    "round_gptq_": "quant.rounding",
    "QuantLinear": "quant.modules",
    "QuantEmbedding": "quant.modules",
    "QATConfig": "config",
    "train_qat": "qat",
    "save_packed": "export",
    "load_packed": "export",
    # deployment (the deploy extra)
    "export_onnx": "deploy.onnx",
    "export_compressed_tensors": "deploy.compressed",
    "OnnxModel": "deploy.runtime",
    "evaluate_onnx": "deploy.runtime",
    # pictures
    "LandscapeConfig": "config",
    "loss_landscape": "landscape",
    "DensityConfig": "config",
    "slq_density": "hessian.density",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qbert_hessian' has no attribute '{name}'")
