"""Everything a GPU session needs, in one run of under 8 minutes:

1. record the card, driver and versions;
2. build the CUDA extension (just in time, as users get it);
3. run the GPU tests (every test marked ``gpu``: bf16, large shapes, determinism, compile);
4. run the kernel benchmarks (and the end-to-end training-step benchmark when present);
5. write ``gpu.md`` (tables), ``gpu.json`` (raw pytest-benchmark data), ``gpu_speedup.png``
   and ``gpu_tests.txt`` into the output folder, and print a summary table;
6. write ``auto_preferences.json``: which fused backend was faster per op and shape class; copied
   to ``fastpe/auto_preferences.json`` it sets the order ``backend="auto"`` tries them in.

    python3 benchmarks/gpu_suite.py                    # writes into benchmarks/results/
    python3 benchmarks/gpu_suite.py --out "$OUT"       # on the lent device machine

Each step has its own time limit, so a hang in one still leaves the others' results.
Without a GPU it stops at once and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT))  # fastpe from this checkout, installed or not

import report  # noqa: E402


BUDGET_SECONDS = 470  # the whole run, so that it fits an 8-minute device session
# (benchmark file, the most seconds it may take)
BENCHMARK_FILES = (("test_bench_rmha.py", 170), ("test_bench_training_step.py", 120), ("test_bench_rotary.py", 90),
                   ("test_bench_concat.py", 90), ("test_bench_tisas.py", 100), ("test_bench_choices.py", 90))


def step(title: str):
    print(f"\n=== {title} ({time.strftime('%H:%M:%S')})", flush=True)


def own_run_env() -> dict:
    """This environment for a pytest run of its own: without a pytest-xdist worker's variables (set
    when this script runs inside the test suite), which make pytest-benchmark disable itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` from the repository root, echoing its output; (returncode, output)."""
    print("+", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**own_run_env(), **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        print(out[-4000:], f"\n!! timed out after {timeout:.0f} s", flush=True)
        return 124, out
    out = proc.stdout + proc.stderr
    print(out[-6000:], flush=True)
    return proc.returncode, out


def environment() -> dict:
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "cuda runtime": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if not torch.cuda.is_available():
        info["gpu"] = "none (--cpu rehearsal: smoke shapes, not measurements)"
        return info
    props = torch.cuda.get_device_properties(0)
    info["gpu"] = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                         capture_output=True, text=True)
    info["driver, max SM clock"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def build_extension(timeout: float) -> str:
    code = ("import time, fastpe._ext as e; t = time.time(); r = e.unavailable_reason(); "
            "print('extension:', 'ready' if r is None else r, f'({time.time() - t:.0f} s)')")
    rc, out = run([sys.executable, "-c", code], timeout)
    line = next((ln for ln in out.splitlines() if ln.startswith("extension:")), "")
    return line.removeprefix("extension: ") or f"build step failed (exit {rc})"


def summary_rows(data: dict) -> list[dict]:
    """One row per benchmark group: the best fused backend against the baseline and the floor."""
    rows = []
    for group, benches in report.groups(data).items():
        if benches[0]["extra_info"].get("op") in ("carca-train-step", "planner-choice"):
            continue  # see training_rows, choice_rows
        med = {report._impl(b): b["stats"]["median"] * 1e3 for b in benches}
        fused = {n: med[n] for n in report.FUSED if n in med}
        pytorch = {n: med[n] for n in report.PYTORCH_BASELINES if n in med}
        floor = next((report._impl(b) for b in benches if b["extra_info"].get("floor")), None)
        row = {"benchmark": group, "best PyTorch ms": min(pytorch.values()) if pytorch else None}
        for name in report.FUSED:
            row[f"{name} ms"] = fused.get(name)
        if fused and pytorch:
            row["speedup"] = min(pytorch.values()) / min(fused.values())
        if fused and floor in med:
            row["best fused / floor"] = min(fused.values()) / med[floor]
        rows.append(row)
    return rows


def training_rows(data: dict) -> list[dict]:
    """One row per encoding of the end-to-end benchmark: sequences/s of each backend/step."""
    rows = []
    for group, benches in report.groups(data).items():
        if benches[0]["extra_info"].get("op") != "carca-train-step":
            continue
        row = {"training step": group}
        for b in sorted(benches, key=lambda b: report._impl(b)):
            row[f"{report._impl(b)} seq/s"] = b["extra_info"].get("seq_per_s")
        rows.append(row)
    return rows


def choice_rows(data: dict) -> list[dict]:
    """One row per planner choice (benchmarks/test_bench_choices.py): the default's time and the
    fastest variant's, and how much faster it is."""
    rows = []
    for group, benches in report.groups(data).items():
        if benches[0]["extra_info"].get("op") != "planner-choice":
            continue
        med = {report._impl(b): b["stats"]["median"] * 1e3 for b in benches}
        fastest = min(med, key=med.get)
        row = {"planner choice": group.removeprefix("choice: "), "default ms": med.get("default"),
               "fastest": fastest, "fastest ms": med[fastest]}
        if med.get("default"):
            row["default / fastest"] = med["default"] / med[fastest]
        rows.append(row)
    return rows


# benchmark "op" -> the fastpe op whose backend it times
BENCH_OPS = {"rmha-4": "relative_attention", "tisas-256": "time_interval_attention", "rotary": "rotary", "rotatory-rotate": "rotary",
             "rotatory-add": "rotatory_add", "concat-projection": "concat_projection"}


def auto_preferences(data: dict) -> dict:
    """Which fused backend ``backend="auto"`` should try first, per op and shape class, from the
    forward+backward benchmarks where both ran: the one with the smaller geometric-mean time."""
    from fastpe.backends import attention_shape_class

    log_ratios: dict[tuple[str, str], list[float]] = {}
    for benches in report.groups(data).values():
        info = benches[0]["extra_info"]
        op = BENCH_OPS.get(info.get("op"))
        if op is None or info.get("mode") != "fwd+bwd":
            continue
        med = {report._impl(b): b["stats"]["median"] for b in benches}
        if "triton" not in med or "cuda" not in med:
            continue
        klass = attention_shape_class(info["L"], info["dh"]) if op == "relative_attention" else "any"
        log_ratios.setdefault((op, klass), []).append(math.log(med["cuda"] / med["triton"]))
    order: dict[str, dict[str, list[str]]] = {}
    for (op, klass), ratios in sorted(log_ratios.items()):
        cuda_faster = sum(ratios) / len(ratios) < 0
        order.setdefault(op, {})[klass] = ["cuda", "triton"] if cuda_faster else ["triton", "cuda"]
    return order


def print_summary(rows: list[dict]) -> str:
    headers = list(dict.fromkeys(k for r in rows for k in r))  # every column, in first-seen order
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(r.get(h)) for h in headers) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the results")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", default="", help="pytest -k expression to restrict the benchmarks")
    parser.add_argument("--cpu", action="store_true",
                        help="rehearse the whole flow on the CPU (smoke shapes, no extension, no GPU tests): checks "
                             "the script itself")
    parser.add_argument("--max-time", default="0.05", help="pytest-benchmark --benchmark-max-time per benchmark")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu:
        print("gpu_suite: no CUDA GPU visible to torch; nothing to do (the CPU benchmarks run with pytest; "
              "--cpu rehearses this script).")
        return 2
    if gpu:
        os.environ.pop("TRITON_INTERPRET", None)  # real kernels, not the interpreter

    step("environment")
    env = environment()
    print(json.dumps(env, indent=2))

    env["cuda extension"] = "not built (--cpu)"
    if gpu:
        step("CUDA extension (just-in-time build)")
        env["cuda extension"] = build_extension(timeout=240)

    tests_line = "not run"
    if gpu and not args.skip_tests:
        step("GPU tests")
        rc, text = run([sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=-ra"], timeout=240)
        (out / "gpu_tests.txt").write_text(text)
        tests_line = next((ln.strip() for ln in reversed(text.splitlines()) if " in " in ln and ("passed" in ln or "failed" in ln or "error" in ln)), f"exit {rc}")
    env["gpu tests"] = tests_line

    # One pytest run per file, each with its own time share and JSON: a file that runs out of
    # time loses only its own numbers. Most important first.
    benchmarks, data = [], None
    for name, share in BENCHMARK_FILES:
        step(f"benchmarks: {name}")
        part = out / f"gpu-{Path(name).stem}.json"
        part.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", f"benchmarks/{name}", "--benchmark-only", f"--benchmark-json={part}",
               f"--benchmark-max-time={args.max_time}", "--benchmark-min-rounds=20", "--benchmark-warmup=on",
               "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
        if args.only:
            cmd += ["-k", args.only]
        remaining = BUDGET_SECONDS - (time.time() - started)
        if remaining < 30:
            print(f"skipped: out of time ({BUDGET_SECONDS} s budget)")
            continue
        run(cmd, timeout=min(share, remaining))
        if part.exists():
            data = json.loads(part.read_text())  # its machine_info serves the report
            benchmarks += data["benchmarks"]
            part.unlink()
    if data is None:
        print("no benchmark results were written")
        return 1
    data["benchmarks"] = benchmarks
    bench_json = out / "gpu.json"

    step("report")
    data["machine_info"].setdefault("fastpe", {}).update(env)
    bench_json.write_text(json.dumps(data, indent=1))
    rows = summary_rows(data)
    table = print_summary(rows)
    training = training_rows(data)
    if training:
        print()
        table += "\n\n" + print_summary(training)
    choices = choice_rows(data)
    if choices:
        print()
        table += "\n\nPlanner choices (a fastest variant other than `default` is a planner change to make):\n\n"
        table += print_summary(choices)
    note = ("Reproduce: `python3 benchmarks/gpu_suite.py` on a GPU machine (builds the extension, runs "
            "`pytest -m gpu`, then `pytest benchmarks --benchmark-only`). Times are medians over rotating input "
            "sets with a device-synchronizing clock; `peak MiB` is CUDA memory allocated above the inputs during one "
            "call; TFLOP/s use the nominal attention FLOPs (QK^T and PV) for every implementation.")
    (out / "gpu.md").write_text(report.markdown(data, "GPU benchmark results") + "\n## Summary\n\n" + table + "\n\n" + note + "\n")
    report.plot_speedups(data, str(out / "gpu_speedup.png"))
    order = auto_preferences(data)
    if order:
        preferences = {"measured": {k: env.get(k) for k in ("date", "gpu", "torch", "triton")}, "order": order}
        (out / "auto_preferences.json").write_text(json.dumps(preferences, indent=1) + "\n")
        print(f"backend='auto' order measured here: {json.dumps(order)}; copy {out}/auto_preferences.json to "
              "fastpe/auto_preferences.json to use it")
    print(f"\nwrote {out}/gpu.md, gpu.json, gpu_speedup.png in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
