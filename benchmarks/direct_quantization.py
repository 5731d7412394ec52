"""Direct (post-training) quantization of a fine-tuned model: uniform 8/4/3/2 bits with 1 and 128 groups, the
allocator's mixed plan at Q-BERT's 2/3-bit setting (average 2.5 bits on the encoder, 8-bit embeddings), and its
packed checkpoint, against the FP32 baseline. Writes benchmarks/DIRECT_QUANT.md.

    python benchmarks/direct_quantization.py --model runs/sst2/checkpoint --report runs/sst2/sensitivity \
        --task sst2 --data ../shared/data/sst2 --max-length 64

The report's folder must hold its cost table, profile.json (``qbert-hessian sensitivity`` writes it;
``qbert-hessian plan --model ...`` measures it for an older report).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from qbert_hessian.allocate import MIB, AllocConfig, Budget, allocate_bits, uniform_plan
from qbert_hessian.artifacts import QuantProfile, SensitivityReport, write_text
from qbert_hessian.evaluate import evaluate
from qbert_hessian.export import file_sizes, fp32_safetensors_bytes, load_packed, save_packed
from qbert_hessian.models import load_model
from qbert_hessian.quant.apply import calibrate_activations, calibration_batches, quantize_model
from qbert_hessian.tasks import load_raw_task, tokenize_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("DIRECT_QUANT.md"))
    args = ap.parse_args()

    report_path = args.report / "sensitivity.json" if args.report.is_dir() else args.report
    report = SensitivityReport.load(report_path)
    profile = QuantProfile.load(report_path.parent / "profile.json")
    raw = load_raw_task(args.task, data_dir=args.data)
    model, tokenizer = load_model(args.model, num_labels=len(raw.label_names), eager=False)
    task = tokenize_task(raw, tokenizer, max_length=args.max_length)
    calib = calibration_batches(task, 8, 32, 0)

    rows = []
    t0 = time.perf_counter()
    m = evaluate(model, task)
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rows.append(("FP32 baseline", "32", "32", "-", "32", m["accuracy"], fp32_bytes / MIB))

    def run(name: str, plan, groups: str) -> float:
        q = quantize_model(model, plan)
        calibrate_activations(q, calib)
        acc = evaluate(q, task)["accuracy"]
        bits = sorted({e["bits"] for b, e in plan.blocks.items() if b.startswith("encoder.")})
        wbits = "/".join(map(str, bits)) + (f" (avg {plan.predicted['encoder_avg_bits']:.2f})" if len(bits) > 1 else "")
        rows.append((name, wbits, "8", groups, "8", acc, plan.predicted["mib"]))
        return acc

    def config(**kwargs) -> AllocConfig:
        # plans use the method the table has; round to nearest, as quantize_model alone does, with static max
        # activation ranges, calibrated below (what DIRECT_QUANT.md measured; not the defaults, gptq and dynamic)
        return AllocConfig(range_method=profile.range_method, rounding="nearest", act_range="max", **kwargs)

    for groups in ("1", "128"):
        for bits in (8, 4, 3, 2):
            run(f"direct, uniform {bits}-bit", uniform_plan(report, profile, bits, config(groups=groups)), groups)
    mixed = allocate_bits(report, profile, Budget(avg_bits=2.5), config(bits=(2, 3), groups=128))
    run("direct, mixed 2/3 (MILP, Omega)", mixed, "128")
    rank = allocate_bits(report, profile, Budget(avg_bits=2.5), config(bits=(2, 3), groups=128, method="rank"))
    run("direct, mixed 2/3 (Q-BERT rank rule)", rank, "128")
    mixed4 = allocate_bits(report, profile, Budget(avg_bits=2.5), config(bits=(2, 3, 4, 8), groups=128))
    run("direct, mixed 2/3/4/8 at avg 2.5 (MILP)", mixed4, "128")

    # The mixed 2/3 plan as a real packed checkpoint, reloaded and evaluated from the file.
    q = quantize_model(model, mixed)
    calibrate_activations(q, calib)
    with tempfile.TemporaryDirectory() as tmp:
        save_packed(q, Path(tmp) / "packed", plan=mixed, tokenizer=tokenizer)
        disk = file_sizes(Path(tmp) / "packed")["weights_bytes"]
        reloaded = load_packed(Path(tmp) / "packed")
        acc_packed = evaluate(reloaded, task)["accuracy"]
    fp32_st = fp32_safetensors_bytes(model)
    seconds = time.perf_counter() - t0

    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    plan_rows = "\n".join(
        f"| `{b}` | {e['bits']} | {e.get('groups')} | {mixed.predicted['per_block'].get(b, {}).get('sensitivity', float('nan')):.4g} |"
        for b, e in mixed.blocks.items()
    )
    lines = [
        "# Direct quantization (no training) vs FP32",
        "",
        f"Model `{args.model}` on {args.task} dev ({m['num_examples']} examples), max length {args.max_length}; "
        f"sensitivity from `{report_path}` ({report.config['draws']} draws). Weights symmetric, fp16 scales; "
        "embeddings 8-bit per row; activations 8-bit (EMA ranges from 8 calibration batches of 32).",
        "",
        f"Command: `{cmd}`",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {seconds:.0f} s.",
        "",
        "| method | w-bits | e-bits | groups | a-bits | dev accuracy | size MiB (plan) |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(f"| {n} | {w} | {e} | {g} | {a} | {acc:.4f} | {mib:.2f} |" for n, w, e, g, a, acc, mib in rows),
        "",
        "## The mixed 2/3-bit plan (Q-BERT's setting: average 2.5 bits on the encoder, 8-bit embeddings)",
        "",
        "| block | bits | groups | Omega |",
        "|---|---:|---|---:|",
        plan_rows,
        "",
        f"- predicted size {mixed.predicted['bytes']:,} bytes; packed `model.safetensors` on disk {disk:,} bytes "
        f"({100 * (disk - mixed.predicted['bytes']) / mixed.predicted['bytes']:+.2f}% vs the plan)",
        f"- FP32 safetensors of the same model: {fp32_st:,} bytes ({fp32_st / MIB:.2f} MiB): "
        f"**{fp32_st / disk:.2f}x smaller** on disk",
        f"- dev accuracy of the packed checkpoint, reloaded from the file: {acc_packed:.4f} "
        f"(fake-quantized model: {rows[9][5]:.4f})",
    ]
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
