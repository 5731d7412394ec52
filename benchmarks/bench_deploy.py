"""Benchmark: what the deployed model costs to serve on a CPU, next to the usual ways of running the same encoder.

For each packed checkpoint given (``--packed``, repeat) and, with ``--bert-base``, a BERT-base-shaped model with
random weights (quantized here: uniform 4-bit, per-head groups, 8-bit embeddings and activations), five engines
run the same shapes, each in its own fresh process:

  torch-fp32        the model in torch, float32 eager (the packed model's dequantized weights: FP32 speed and size)
  ort-fp32          the same FP32 model exported to ONNX, ONNX Runtime
  ort-dynamic-int8  ONNX Runtime's own ``quantize_dynamic`` (per-tensor int8 weights, int8 MatMulInteger)
  torch-dynamic-int8 ``torch.ao.quantization.quantize_dynamic`` over the Linear layers
  ours              ``qbert-hessian export --format onnx`` (MatMulNBits 2/4/8-bit, int8 compute), ONNX Runtime

Measured per engine: the file's size; resident memory (VmRSS) after importing the runtime (its baseline), after
loading the model and after one batch, and the peak (VmHWM); latency at batch 1 x 64 tokens and 8 x 128 tokens,
median over ``--repeats`` runs after ``--warmup`` runs, ``--threads`` intra-op threads (2 by default). With
``--task`` (and ``--data``) each packed model's dev score is computed from the exported file and from the packed
model in torch.

Writes benchmarks/DEPLOY.md (command, machine, versions, one table per model). Run it on a quiet machine:

    python benchmarks/bench_deploy.py --packed runs/sst2/packed --bert-base --task sst2 --data ../shared/data/sst2

``--tiny`` replaces BERT-base by a 2-layer model of hidden 64, to check the script end to end in a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((1, 64), (8, 128))
ENGINES = ("torch-fp32", "ort-fp32", "ort-dynamic-int8", "torch-dynamic-int8", "ours")
VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] the a movie film is was good bad great awful fun plot".split()


def rss() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


# ------------------------------------------------------------------------------------------ child: one engine


def child(engine: str, artifact: Path, threads: int, warmup: int, repeats: int, vocab: int, max_len: int) -> dict:
    import numpy as np

    if engine.startswith("torch"):
        import torch
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(threads)
    else:
        import onnxruntime as ort
    base = rss()["VmRSS"]
    t0 = time.perf_counter()
    if engine.startswith("torch"):
        model = AutoModelForSequenceClassification.from_pretrained(artifact, attn_implementation="sdpa").eval()
        if engine == "torch-dynamic-int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

        def run(ids, mask):
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}

        def run(ids, mask):
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            return session.run(None, {k: v for k, v in feed.items() if k in names})

    load_s = time.perf_counter() - t0
    after_load = rss()
    rng = np.random.default_rng(0)
    result = {"engine": engine, "load_s": load_s, "rss_base": base, "rss_load": after_load["VmRSS"]}
    for i, (batch, length) in enumerate(SHAPES):
        ids = rng.integers(5, vocab, (batch, min(length, max_len))).astype(np.int64)
        mask = np.ones_like(ids)
        run(ids, mask)
        if i == 0:
            result["rss_batch"] = rss()["VmRSS"]
        for _ in range(warmup):
            run(ids, mask)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(ids, mask)
            times.append(time.perf_counter() - t)
        result[f"ms_{batch}x{length}"] = 1000 * statistics.median(times)
    result["rss_peak"] = rss()["VmHWM"]
    return result


# ----------------------------------------------------------------------------------------- parent: artifacts


def random_packed(out: Path, *, tiny: bool) -> Path:
    """A BERT-base-shaped classifier with random weights, quantized (4-bit per-head, 8-bit embeddings), packed."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from qbert_hessian.artifacts import BitPlan
    from qbert_hessian.export import save_packed
    from qbert_hessian.quant.apply import calibrate_activations, quantize_model

    cfg = (
        BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        if tiny
        else BertConfig()
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    blocks = {f"encoder.{i}": {"bits": 4, "groups": "heads"} for i in range(cfg.num_hidden_layers)}
    blocks["embeddings"] = {"bits": 8, "groups": "channel"}
    shape = {"num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads, "hidden_size": cfg.hidden_size}
    plan = BitPlan(model=shape, blocks=blocks, act_bits=8)
    q = quantize_model(model, plan, inplace=True)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, cfg.vocab_size, (8, 128), generator=g)} for _ in range(2)]
    calibrate_activations(q, batches)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab = out.parent / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    save_packed(q, out, plan=plan, tokenizer=BertTokenizerFast(vocab_file=str(vocab)))
    return out


def fp32_artifacts(packed: Path, work: Path) -> dict[str, Path]:
    """The packed model's FP32 twin (dequantized weights, plain modules) as a folder and as ONNX, and ONNX
    Runtime's dynamic int8 quantization of that ONNX file."""
    import warnings

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qbert_hessian.export import load_packed
    from qbert_hessian.quant.modules import QuantEmbedding, QuantLinear

    model = load_packed(packed, eager=True)
    for name, m in list(model.named_modules()):
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            plain = torch.nn.Linear(m.in_features, m.out_features) if isinstance(m, QuantLinear) else None
            if plain is None:
                plain = torch.nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx)
            else:
                plain.bias = m.bias
            plain.weight = torch.nn.Parameter(m.weight.detach().clone())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, plain)
    folder = work / "fp32"
    model.save_pretrained(folder)
    ids = torch.randint(5, 15, (2, 16))
    onnx_fp32 = work / "fp32.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(onnx_fp32),
            dynamo=False,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["logits"],
            dynamic_axes={n: {0: "b", 1: "s"} for n in ("input_ids", "attention_mask", "token_type_ids")},
            opset_version=17,
        )
    onnx_int8 = work / "fp32.int8.onnx"
    quantize_dynamic(str(onnx_fp32), str(onnx_int8), weight_type=QuantType.QInt8)
    return {"torch-fp32": folder, "ort-fp32": onnx_fp32, "ort-dynamic-int8": onnx_int8, "torch-dynamic-int8": folder}


def file_size(engine: str, path: Path) -> int | None:
    if engine == "torch-dynamic-int8":
        return None  # quantized at load; torch has no file format of its own for it here
    if path.is_dir():
        return (path / "model.safetensors").stat().st_size
    return path.stat().st_size


def scores(packed: Path, ours: Path, task: str, data: str | None, max_length: int) -> dict[str, dict]:
    from qbert_hessian.deploy.runtime import OnnxModel, evaluate_onnx
    from qbert_hessian.evaluate import evaluate
    from qbert_hessian.export import load_packed
    from qbert_hessian.models import load_tokenizer
    from qbert_hessian.tasks import load_raw_task, tokenize_task

    raw = load_raw_task(task, data_dir=data)
    task_t = tokenize_task(raw, load_tokenizer(str(packed)), max_length=max_length)
    return {
        "packed (torch)": evaluate(load_packed(packed), task_t),
        "ours (onnx int8)": evaluate_onnx(OnnxModel(ours.parents[1]), task_t),
    }


def run_engines(name: str, packed: Path, args: argparse.Namespace, work: Path) -> dict:
    from qbert_hessian.deploy.onnx import export_onnx

    work.mkdir(parents=True)
    artifacts = fp32_artifacts(packed, work)
    artifacts["ours"] = export_onnx(packed, work / "deploy")
    config = json.loads((packed / "config.json").read_text())
    vocab, max_len = config["vocab_size"], config.get("max_position_embeddings", 512)
    rows = []
    for engine in ENGINES:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            engine,
            "--artifact",
            str(artifacts[engine]),
            "--threads",
            str(args.threads),
            "--warmup",
            str(args.warmup),
            "--repeats",
            str(args.repeats),
            "--vocab",
            str(vocab),
            "--max-len",
            str(max_len),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        )
        if proc.returncode:
            rows.append({"engine": engine, "error": proc.stderr.strip().splitlines()[-1][:200]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["file_bytes"] = file_size(engine, artifacts[engine])
        rows.append(row)
    result = {
        "name": name,
        "packed": str(packed),
        "max_len": max_len,
        "packed_bytes": (packed / "model.safetensors").stat().st_size,
        "rows": rows,
    }
    if args.task:
        result["scores"] = scores(packed, artifacts["ours"], args.task, args.data, args.max_length)
    return result


# --------------------------------------------------------------------------------------------------- report


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def markdown(results: list[dict], args: argparse.Namespace, argv: list[str]) -> str:
    import onnxruntime
    import torch
    import transformers

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    lines = [
        "# Deploying the compressed model: size, memory and speed",
        "",
        f"Command: `python benchmarks/bench_deploy.py {' '.join(argv)}` at commit {commit.strip() or '?'}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, ISA {', '.join(isa) or 'no VNNI'};"
        f" torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}.",
        f"Each engine in a fresh process, {args.threads} intra-op threads, median of {args.repeats} runs after "
        f"{args.warmup} warm-up runs. Memory: resident set (VmRSS) above the process's RSS once the runtime is "
        "imported; peak is VmHWM (the whole process). torch-dynamic-int8 quantizes at load (no file of its own).",
        "",
    ]
    for r in results:
        lines += [f"## {r['name']}", "", f"Packed checkpoint `{r['packed']}`: {mib(r['packed_bytes'])} MiB."]
        if r["max_len"] < max(length for _, length in SHAPES):
            lines[-1] += f" Sequences clamped to {r['max_len']} tokens (the model's max_position_embeddings)."
        lines.append("")
        lines += [
            "| engine | file MiB | load s | RSS after load MiB | RSS after batch MiB | peak MiB | ms 1x64 | ms 8x128 |"
            " speed-up 8x128 vs torch-fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ok = {row["engine"]: row for row in r["rows"] if "error" not in row}
        ref = ok.get("torch-fp32", {}).get("ms_8x128")
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {row['engine']} | failed: {row['error']} |||||||")
                continue
            speed = f"{ref / row['ms_8x128']:.2f}x" if ref else "-"
            lines.append(
                f"| {row['engine']} | {mib(row['file_bytes'])} | {row['load_s']:.2f} | "
                f"{mib(row['rss_load'] - row['rss_base'])} | {mib(row['rss_batch'] - row['rss_base'])} | "
                f"{mib(row['rss_peak'])} | {row['ms_1x64']:.1f} | {row['ms_8x128']:.1f} | {speed} |"
            )
        if "ours" in ok:
            ours = ok["ours"]
            lines += [
                "",
                f"Ours: file / packed checkpoint = {ours['file_bytes'] / r['packed_bytes']:.2f}x (target 1.10x); "
                f"RSS after a batch / file = {(ours['rss_batch'] - ours['rss_base']) / ours['file_bytes']:.2f}x "
                "(target 1.3x).",
            ]
            if "ort-fp32" in ok:
                lines[-1] += (
                    f" Speed-up at 8x128 vs ONNX Runtime FP32: {ok['ort-fp32']['ms_8x128'] / ours['ms_8x128']:.2f}x (target 1.2x)."
                )
        if "scores" in r:
            lines += [
                "",
                "| dev score | "
                + " | ".join(k for k in next(iter(r["scores"].values())) if k != "num_examples")
                + " |",
            ]
            lines.append("|---|" + "---:|" * (len(lines[-1].split("|")) - 3))
            for name, m in r["scores"].items():
                lines.append(
                    f"| {name} | " + " | ".join(f"{v:.4f}" for k, v in m.items() if k != "num_examples") + " |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packed", type=Path, action="append", default=[], help="packed checkpoint (repeat)")
    p.add_argument("--bert-base", action="store_true", help="also a BERT-base-shaped random model, 4-bit")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model instead of BERT-base (a check)")
    p.add_argument("--task", default=None, help="score each packed model's dev split (e.g. sst2)")
    p.add_argument("--data", default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "DEPLOY.md")
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--max-len", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(
            json.dumps(
                child(args.child, args.artifact, args.threads, args.warmup, args.repeats, args.vocab, args.max_len)
            )
        )
        return
    if not args.packed and not (args.bert_base or args.tiny):
        p.error("give --packed DIR and/or --bert-base (or --tiny)")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        work = Path(tmp)
        for i, packed in enumerate(args.packed):
            results.append(run_engines(f"{packed}", packed, args, work / f"m{i}"))
        if args.bert_base or args.tiny:
            name = "tiny random (2 layers, hidden 64)" if args.tiny else "BERT-base shape, random weights"
            rand = random_packed(work / "random" / "packed", tiny=args.tiny)
            results.append(
                run_engines(f"{name}, 4-bit per-head, 8-bit embeddings", rand, without_task(args), work / "r")
            )
    args.out.write_text(markdown(results, args, argv), encoding="utf-8")
    print(f"wrote {args.out}")


def without_task(args: argparse.Namespace) -> argparse.Namespace:
    """The random model has no task data: no dev score."""
    return argparse.Namespace(**{**vars(args), "task": None})


if __name__ == "__main__":
    main()
