"""Why curvlinops' Hessian-vector products of a BERT block are off: torch.func's jvp over jacrev through layer_norm.

curvlinops 3 multiplies the Hessian as ``jvp(jacrev(loss), params, v)`` (forward over reverse, the reverse
pass vmapped by ``jacrev``). For a layer_norm whose input and weight both depend on the parameters, that
composition disagrees with a central finite difference of the gradient, while ``jvp(grad(loss))`` and
autograd's double backward agree with it. Float64 throughout, so rounding is not the cause.

    python benchmarks/jvp_jacrev_layernorm.py
"""

from __future__ import annotations

import torch
from torch.func import grad, jacrev, jvp


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    W, w = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    tW, tw = torch.randn_like(W), torch.randn_like(w)

    def loss(W: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x @ W, (5,), w).pow(3).sum()

    def flat(ts) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    eps = 1e-5
    plus = grad(loss, argnums=(0, 1))(W + eps * tW, w + eps * tw)
    minus = grad(loss, argnums=(0, 1))(W - eps * tW, w - eps * tw)
    fd = flat([(p - m) / (2 * eps) for p, m in zip(plus, minus)])
    for name, inner in (("jvp(grad)", grad), ("jvp(jacrev)", jacrev)):
        hv = flat(jvp(inner(loss, argnums=(0, 1)), (W, w), (tW, tw))[1])
        print(f"{name:12s} vs central difference: {float((hv - fd).norm() / fd.norm()):.1e} relative")
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
