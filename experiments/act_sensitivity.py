"""Where the 8-bit activation loss comes from: one quantized activation at a time, for each activation range.

python experiments/act_sensitivity.py --model runs/conll03_minilm/checkpoint --task conll03 \
    --data ../shared/data/conll2003 --max-eval-samples 250 --out experiments/act_sensitivity_conll03.md

Every weight stays FP32. Each linear of the encoder (``encoder.i.query|key|value|attn_out|ffn_in|ffn_out``) is one
activation site: the input that linear quantizes when a plan sets ``act_bits``. For each activation range
(``--act-ranges``: max, percentile, mse, dynamic; ``quant/ranges.py``) the script quantizes ONE site's input to
``--act-bits`` bits and scores the dev subset, for every site in turn, then all sites at once. The table gives the
change of the task's metric and of the dev loss against FP32 per site, and the static ranges each method chose.

Ranges of the one-site rows are calibrated with every other site in FP32 (what that site sees when it alone is
quantized): ``max`` as the EMA of max|x| over the calibration batches (momentum 0.9), ``percentile`` and ``mse`` from
the |x| sampled on the same batches. The all-sites row calibrates as ``quantize`` does
(:func:`~qbert_hessian.quant.apply.calibrate_activations`: upstream sites already quantized).

Writes the markdown table to ``--out`` (with the command, machine, seeds and budget) and the numbers beside it as
JSON (``--out`` with ``.json``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from qbert_hessian.artifacts import write_text
from qbert_hessian.config import ACT_RANGES, check_act_range, check_bits
from qbert_hessian.errors import QBHError
from qbert_hessian.evaluate import evaluate
from qbert_hessian.models import BlockMap
from qbert_hessian.quant.apply import calibrate_activations, calibration_batches
from qbert_hessian.quant.modules import ActQuant
from qbert_hessian.quant.ranges import ACT_PERCENTILE, ACT_SAMPLES
from qbert_hessian.stages import load_for_task
from qbert_hessian.tasks import dev_subset, load_raw_task, subset

# The metric each family's table reports (SQuAD and CoNLL-03 as F1, as experiments/RESULTS.md does).
PRIMARY = {"classification": "accuracy", "token": "f1", "qa": "f1"}


class Probes:
    """An activation quantizer in front of each site's linear (forward pre-hooks), switched on site by site.

    The quantizers are children of their linears (``<linear>.act_probe``), so
    :func:`~qbert_hessian.quant.apply.calibrate_activations` finds them as it finds a plan's.
    """

    def __init__(self, model: nn.Module, sites: dict[str, str], act_range: str, bits: int) -> None:
        self.model, self.sites = model, sites
        self.acts: dict[str, ActQuant] = {}
        self.enabled: set[str] = set()
        self.calibrating = False
        self._hooks = []
        device = next(model.parameters()).device
        for name, path in sites.items():
            linear = model.get_submodule(path)
            act = ActQuant(bits, range_method=act_range).to(device)
            linear.add_module("act_probe", act)
            self.acts[name] = act
            self._hooks.append(linear.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            act, x = self.acts[name], args[0]
            if self.calibrating:  # every site in FP32; each range sees its own input
                if act.range_method == "max":
                    act.observe(x)
                elif act.range_method != "dynamic":
                    act(x)  # sampling: kept, passed on unquantized
                return None
            return (act(x), *args[1:]) if name in self.enabled else None

        return hook

    @torch.no_grad()
    def calibrate_each_alone(self, batches: list[dict[str, torch.Tensor]], seed: int) -> None:
        """Every site's range as if it alone were quantized (all others FP32)."""
        sampled = [a for a in self.acts.values() if a.range_method in ("percentile", "mse")]
        for i, act in enumerate(sampled):
            act.begin_sampling(-(-ACT_SAMPLES // len(batches)), [seed, i])
        device = next(self.model.parameters()).device
        self.calibrating = True
        try:
            for batch in batches:
                self.model(**{k: v.to(device) for k, v in batch.items()})
        finally:
            self.calibrating = False
        for act in sampled:
            act.end_sampling()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for path in self.sites.values():
            delattr(self.model.get_submodule(path), "act_probe")


def activation_sites(model: nn.Module) -> dict[str, str]:
    """Canonical name -> module path of every encoder linear (each one's input is an activation site)."""
    bm = BlockMap(model)
    return {n: p for i in range(bm.num_layers) for n, p in bm.unit_modules(f"encoder.{i}")}


def score(model: nn.Module, task: Any, family: str) -> tuple[float, float]:
    m = evaluate(model, task)
    return float(m[PRIMARY[family]]), float(m["loss"])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    raw = dev_subset(load_raw_task(args.task, data_dir=args.data), args.max_eval_samples, args.seed)
    raw = subset(raw, args.max_train_samples, args.seed)  # the calibration batches' pool (SQuAD: not 123,000 windows)
    model, task = load_for_task(args.model, raw, max_length=args.max_length, eager=False, device=args.device)
    model.eval()
    family = task.family
    sites = activation_sites(model)
    if args.sites:
        unknown = sorted(set(args.sites) - set(sites))
        if unknown:
            raise QBHError(f"no activation site {', '.join(unknown)}; this model has {', '.join(sites)}")
        sites = {n: sites[n] for n in args.sites}
    batches = calibration_batches(task, args.calibration_batches, args.batch_size, args.seed)
    fp32_metric, fp32_loss = score(model, task, family)
    rows: dict[str, dict[str, Any]] = {n: {} for n in [*sites, "all"]}
    for act_range in args.act_ranges:
        probes = Probes(model, sites, act_range, args.act_bits)
        try:
            if act_range != "dynamic":
                probes.calibrate_each_alone(batches, args.seed)
            for name in tqdm(list(sites), desc=f"{act_range}: one site at a time", disable=args.quiet):
                probes.enabled = {name}
                metric, loss = score(model, task, family)
                act = probes.acts[name]
                rows[name][act_range] = {
                    "metric": metric,
                    "loss": loss,
                    "amax": None if act.amax is None else float(act.amax),
                    "peak": act.peak if act_range in ("percentile", "mse") else None,
                }
        finally:
            probes.remove()
        probes = Probes(model, sites, act_range, args.act_bits)  # fresh ranges: calibrated as quantize does
        try:
            probes.enabled = set(sites)
            if act_range != "dynamic":
                calibrate_activations(model, batches, seed=args.seed)
            metric, loss = score(model, task, family)
            rows["all"][act_range] = {"metric": metric, "loss": loss, "amax": None}
        finally:
            probes.remove()
    return {
        "task": args.task,
        "family": family,
        "metric": PRIMARY[family],
        "fp32": {"metric": fp32_metric, "loss": fp32_loss},
        "num_eval": len(task.dev),
        "rows": rows,
    }


def peak_ratio(row: dict[str, Any]) -> str:
    """The site's largest |x| over its 99.99th percentile: how far its outliers stand out."""
    p = row.get("percentile", {})
    return f"{p['peak'] / p['amax']:.1f}" if p.get("peak") and p.get("amax") else "-"


def table(result: dict[str, Any], act_ranges: list[str]) -> list[str]:
    fp = result["fp32"]
    scale = 100.0  # points
    head = ["site", "peak/p99.99", *[f"Δ{result['metric']} {r}" for r in act_ranges]]
    head += [f"Δloss {r}" for r in act_ranges]
    head += [f"amax {r}" for r in act_ranges if r != "dynamic"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    rows = result["rows"]
    order = [n for n in rows if n != "all"]
    # worst first, by the default (first) range's loss increase
    first = act_ranges[0]
    order.sort(key=lambda n: -(rows[n][first]["loss"] - fp["loss"]))
    for name in [*order, "all"]:
        r = rows[name]
        cells = [name if name != "all" else f"**all {len(order)} sites**", peak_ratio(r) if name != "all" else "-"]
        cells += [f"{scale * (r[a]['metric'] - fp['metric']):+.2f}" for a in act_ranges]
        cells += [f"{r[a]['loss'] - fp['loss']:+.4f}" for a in act_ranges]
        cells += ["-" if r[a]["amax"] is None else f"{r[a]['amax']:.3g}" for a in act_ranges if a != "dynamic"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def machine() -> str:
    import platform

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {gpu}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the fine-tuned FP32 checkpoint")
    p.add_argument("--task", required=True, help="task name, as for qbert-hessian evaluate (sst2, conll03, squad)")
    p.add_argument("--data", default=None, help="the task's data folder")
    p.add_argument("--out", type=Path, required=True, help="markdown file to write (numbers beside it as .json)")
    p.add_argument("--act-ranges", default=",".join(ACT_RANGES), help="comma-separated activation ranges")
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--sites", default=None, help="comma-separated sites (default: every encoder linear)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="score a seeded dev subset of this size")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument(
        "--max-train-samples", type=int, default=None, help="draw the calibration batches from a seeded subset"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="draws the calibration batches, the samples, the dev subset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        args.act_ranges = [check_act_range(r.strip(), "--act-ranges") for r in args.act_ranges.split(",")]
        args.sites = None if args.sites is None else [s.strip() for s in args.sites.split(",")]
        check_bits(args.act_bits, "--act-bits", role="activation")
        start = time.perf_counter()
        result = measure(args)
        seconds = time.perf_counter() - start
    except QBHError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python experiments/act_sensitivity.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    fp = result["fp32"]
    text = [
        f"## Activation sites, one at a time: {args.task}",
        "",
        f"`{command}`",
        "",
        f"Machine: {machine()}; {seconds / 60:.1f} min. Weights FP32; one encoder linear's input at a time "
        f"quantized to {args.act_bits} bits, then all at once. Dev subset: {result['num_eval']} examples (seed "
        f"{args.seed}); calibration: {args.calibration_batches} batches of {args.batch_size} training examples "
        f"(seed {args.seed}"
        + (f", from a seeded {args.max_train_samples:,} of the training split" if args.max_train_samples else "")
        + f"); percentile {ACT_PERCENTILE}; percentile and mse from at most {ACT_SAMPLES} sampled |x| "
        "per site.",
        "",
        f"FP32: {result['metric']} {fp['metric']:.4f}, loss {fp['loss']:.4f}. Δ{result['metric']} in points, Δloss "
        "in nats; rows sorted by the first range's Δloss; peak/p99.99 is the site's largest |x| over its 99.99th "
        "percentile (how far its outliers stand out; from the percentile run).",
        "",
        *table(result, args.act_ranges),
    ]
    write_text(args.out, "\n".join(text) + "\n")
    record = {**result, "command": command, "machine": machine(), "seconds": seconds, "settings": vars(args)}
    write_text(args.out.with_suffix(".json"), json.dumps(record, indent=2, default=str) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
