"""``python -m qbert_hessian.cli``: the same CLI as ``qbert-hessian`` (``python -m qbert_hessian`` also holds
Ctrl-C until torch is imported)."""

from .main import entry

if __name__ == "__main__":
    entry()
