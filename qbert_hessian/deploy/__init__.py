"""What leaves the toolkit: a packed checkpoint as an ONNX Runtime model (``onnx.py``: MatMulNBits and
GatherBlockQuantized over the stored 2/4/8-bit codes, int8 compute or exact), as a compressed-tensors folder that
plain ``transformers`` loads (``compressed.py``), and a runtime entry that scores and serves the ONNX file
(``runtime.py``). The layouts themselves are pure tensor functions (``layout.py``).

Needs the ``deploy`` extra: ``pip install 'qbert_hessian[deploy]'``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy (PEP 562): importing the package does not import onnx, onnxruntime or compressed-tensors.
_EXPORTS = {
    "export_onnx": "onnx",
    "export_compressed_tensors": "compressed",
    "OnnxModel": "runtime",
    "evaluate_onnx": "runtime",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qbert_hessian.deploy' has no attribute '{name}'")
