"""Runtime benchmark: images/s and cold start of the AOTI package vs eager vs torch.compile.

    python bench/runtime.py                        # CPU: Lite0 + ResNet-18, batch 1, 8, 32
    python bench/runtime.py --device cuda          # GPU: bf16 channels_last, batch 64, 256

All three run the same module (the packaged model, normalisation included) on the same uint8
input; throughput is the median of several timed rounds after warm-up. Cold start is a fresh
process from its start to the first prediction, each run twice and the second kept (disk caches
warm, as on a worker that restarts). Prints a table and writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.packages import cached_package  # noqa: E402
from worker.cxx_runtime import ensure_cxx_runtime  # noqa: E402

# Each cold start imports only what that kind needs: a worker serving a package never imports
# torchvision or the model's Python code; eager and torch.compile must build the model.
COLD_START = {
    "eager": "m = build(); x = example(); m(x); sync()",
    "compile": "m = torch.compile(build()); x = example(); m(x); sync()",
    "aoti": "from worker.runtime import load_runtime; r = load_runtime(PKG, warmup=False); r.predict(example().cpu())",
}
COLD_PRELUDE = """
import sys, torch
sys.path.insert(0, {root!r})
DEV, PKG = {device!r}, {package!r}
def build():
    from compile.models import resolve_model
    from compile.package import PackagedModel, DTYPES
    spec = resolve_model({model!r})
    dtype = DTYPES[{dtype!r}]
    return PackagedModel(spec.module.to(dtype), spec.preprocess, dtype, {cl}).to(DEV).eval()
def example():
    return torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, device=DEV)
def sync():
    DEV == "cuda" and torch.cuda.synchronize()
with torch.inference_mode():
    {body}
print("READY")
"""


def images_per_second(runners: dict, batch, device: str, seconds: float) -> dict[str, float]:
    """Median images/s of each runner over 5 timed rounds. The rounds of all runners interleave, so
    a drift of the clock or of the machine's load falls on each of them alike."""
    import torch

    def synced(fn):
        def run() -> None:
            fn(batch)
            if device == "cuda":
                torch.cuda.synchronize()

        return run

    runs = {name: synced(fn) for name, fn in runners.items()}
    for run in runs.values():
        for _ in range(3):
            run()
    per_round = {name: max(1, int(seconds / 5 / _time_once(run))) for name, run in runs.items()}
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(5):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(per_round[name]):
                run()
            rounds[name].append(batch.shape[0] * per_round[name] / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rounds.items()}


def _time_once(run) -> float:
    start = time.perf_counter()
    run()
    return max(time.perf_counter() - start, 1e-6)


def cold_start(kind: str, model: str, package: Path, device: str, dtype: str, channels_last: bool) -> float:
    code = COLD_PRELUDE.format(
        root=str(ROOT),
        device=device,
        package=str(package),
        model=model,
        dtype=dtype,
        cl=channels_last,
        body=COLD_START[kind],
    )
    times = []
    for _ in range(2):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if "READY" not in done.stdout:
            raise RuntimeError(f"cold start of {kind} failed:\n{done.stderr[-2000:]}")
        times.append(time.perf_counter() - start)
    return times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", default="efficientnet_lite0,resnet18")
    parser.add_argument("--batches", help="comma-separated [cpu: 1,8,32; cuda: 64,256]")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on CPU")
    parser.add_argument("--tune-batch", type=int, help="build the packages with this --tune-batch [default: max]")
    parser.add_argument(
        "--max-autotune",
        action="store_true",
        help="build the packages with --max-autotune, and torch.compile with max-autotune-no-cudagraphs",
    )
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--out", type=Path, help="JSON path [default: bench/results/runtime-DEVICE.json]")
    args = parser.parse_args()
    ensure_cxx_runtime()

    import logging

    import torch

    from compile.models import resolve_model
    from compile.package import DTYPES, BuildOptions, PackagedModel
    from worker.runtime import load_runtime

    logging.basicConfig(level=logging.WARNING)
    cuda = args.device == "cuda"
    dtype, channels_last = ("bfloat16", True) if cuda else ("float32", False)
    batches = [int(b) for b in (args.batches or ("64,256" if cuda else "1,8,32")).split(",")]
    torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
    results = {
        "device": args.device,
        "dtype": dtype,
        "channels_last": channels_last,
        "threads": args.threads,
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu": platform.processor(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "max_autotune": args.max_autotune,
        "models": {},
    }
    for model in args.models.split(","):
        max_batch = max(max(batches), 3)  # the smallest range a package can have
        options = BuildOptions(args.device, dtype, channels_last, max_batch, args.max_autotune, args.tune_batch)
        package, build_s = cached_package(model, options)
        entry = {"throughput": {}, "cold_start_s": {}, "tune_batch": options.example_batch}
        if build_s is not None:
            entry["package_build_s"] = build_s
        ensure_cxx_runtime(package)  # restarts this benchmark where the host needs the preload
        runtime = load_runtime(package, args.device)
        spec = resolve_model(model)
        eager = PackagedModel(spec.module.to(DTYPES[dtype]), spec.preprocess, DTYPES[dtype], channels_last)
        eager = eager.to(args.device).eval()
        compiled = torch.compile(eager, mode="max-autotune-no-cudagraphs" if args.max_autotune else None)
        for batch_size in batches:
            runners = {"eager": eager, "compile": compiled, "aoti": runtime._model}
            x = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, device=args.device)
            if batch_size < runtime.manifest.batch_min:
                # Below the exported range: the runtime pads (and adds softmax): time that.
                runners["aoti"] = runtime.predict
            with torch.inference_mode():
                row = images_per_second(runners, x, args.device, args.seconds)
            row["aoti_vs_eager"] = row["aoti"] / row["eager"]
            row["aoti_vs_compile"] = row["aoti"] / row["compile"]
            entry["throughput"][str(batch_size)] = row
            print(
                f"{model:20s} batch {batch_size:4d}: " + "  ".join(f"{k} {v:,.1f}" for k, v in row.items()), flush=True
            )
        if not args.no_cold_start:
            for kind in COLD_START:
                entry["cold_start_s"][kind] = cold_start(kind, model, package, args.device, dtype, channels_last)
            cs = entry["cold_start_s"]
            entry["cold_start_ratio"] = {
                "aoti_vs_eager": cs["aoti"] / cs["eager"],
                "compile_vs_aoti": cs["compile"] / cs["aoti"],
            }
        results["models"][model] = entry

    print(
        f"\nkiln runtime benchmark: {args.device}, {dtype}{' channels_last' if channels_last else ''}, "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    header = ("model", "batch", "eager", "compile", "aoti", "aoti/eager", "aoti/compile")
    print("{:20s} {:>5s} {:>10s} {:>10s} {:>10s} {:>10s} {:>12s}".format(*header))
    for model, entry in results["models"].items():
        for b, row in entry["throughput"].items():
            print(
                f"{model:20s} {b:>5s} {row['eager']:10,.1f} {row['compile']:10,.1f} {row['aoti']:10,.1f} "
                f"{row['aoti_vs_eager']:10.2f} {row['aoti_vs_compile']:12.2f}"
            )
    if not args.no_cold_start:
        header = ("cold start (s)", "eager", "compile", "aoti", "aoti/eager", "compile/aoti")
        print("\n{:20s} {:>8s} {:>8s} {:>8s} {:>10s} {:>12s}".format(*header))
        for model, entry in results["models"].items():
            cs, r = entry["cold_start_s"], entry["cold_start_ratio"]
            print(
                f"{model:20s} {cs['eager']:8.2f} {cs['compile']:8.2f} {cs['aoti']:8.2f} "
                f"{r['aoti_vs_eager']:10.2f} {r['compile_vs_aoti']:12.2f}"
            )
    out = args.out or ROOT / "bench" / "results" / f"runtime-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
