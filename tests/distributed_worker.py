"""One rank of tests/cli/test_distributed_cli.py, started by ``torchrun --nproc-per-node 2``.

It joins one gloo process group, runs the commands the test wrote to ``<out>/plan.json`` through the CLI (as
``torchrun -m qbert_hessian <command>`` would, one start-up for all of them), then records what this rank holds
(a data-parallel Hessian-vector product and a sensitivity report) in ``<out>/rank<R>.json`` for the test to
compare with one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def held_by_this_rank(spec: dict) -> dict:
    """A data-parallel product on this rank's share of a draw, and the report this rank returns."""
    import torch

    from qbert_hessian import distributed
    from qbert_hessian.config import SensitivityConfig
    from qbert_hessian.hessian import vec
    from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled
    from qbert_hessian.models import BlockMap, load_model
    from qbert_hessian.sensitivity import estimate_sensitivity
    from qbert_hessian.tasks import load_task

    model, tokenizer = load_model(spec["model"], num_labels=2)
    task = load_task("sst2", tokenizer, data_dir=spec["data"], max_length=16)
    batches = [task.batch("train", idx) for idx in spec["hvp_batches"]]
    params = BlockMap(model).parameters("embeddings")
    with curvature_mode(model), grads_enabled(params):
        hvp = BlockHessian(model, params, distributed.shard(batches), data_parallel=True)
        v = vec.randn_like(hvp.like, torch.Generator().manual_seed(5))
        hv = hvp(v)
    report = estimate_sensitivity(model, task, SensitivityConfig(**spec["sensitivity"]), progress=False)
    return {
        "rows": [None if r is None else r.tolist() for r in hvp.rows],
        "loss": hvp.loss,
        "hv": vec.flatten(hv).tolist(),
        "eigenvalues": {b.name: b.eigenvalues for b in report.blocks},
    }


def main() -> None:
    out = Path(sys.argv[1])
    spec = json.loads((out / "plan.json").read_text())
    import torch

    from qbert_hessian import distributed
    from qbert_hessian.cli import main as cli

    torch.set_num_threads(1)
    world = distributed.world_from_env()
    distributed.start(world, "cpu")
    codes = {name: cli(argv) for name, argv in spec["commands"].items()}
    record = {"codes": codes, "world": [world.rank, world.size], **held_by_this_rank(spec)}
    (out / f"rank{world.rank}.json").write_text(json.dumps(record))
    distributed.stop()


if __name__ == "__main__":
    main()
