"""What leaves the toolkit: a packed checkpoint as an ONNX Runtime model (``onnx.py``: MatMulNBits and
GatherBlockQuantized over the stored 2/4/8-bit codes, int8 compute or exact), as a compressed-tensors folder that
plain ``transformers`` loads (``compressed.py``), and a runtime entry that scores and serves the ONNX file
(``runtime.py``). The layouts themselves are pure tensor functions (``layout.py``).

Needs the ``deploy`` extra: ``pip install 'qbert_hessian[deploy]'``.
"""
