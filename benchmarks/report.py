"""Turn a pytest-benchmark JSON file into a markdown report (and optionally a speedup plot).

    python benchmarks/report.py bench.json --out benchmarks/results/cpu.md --title "CPU"

Within each benchmark group, every row is compared with the group's baseline: the benchmark
whose ``extra_info["baseline"]`` is true (ratio > 1 means faster / smaller than the baseline).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

METRICS = (("seq_per_s", "sequences/s"), ("peak_extra_mib", "peak extra MiB"), ("peak_mib", "peak MiB"), ("gbps", "GB/s"), ("tflops", "TFLOP/s"))


def _impl(bench: dict) -> str:
    return bench["extra_info"].get("impl") or bench.get("param") or bench["name"]


def groups(data: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        out.setdefault(bench["group"] or bench["name"], []).append(bench)
    return out


def speedups(rows: list[dict]) -> dict[str, float]:
    """``impl -> baseline median / impl median`` for a group (empty without a baseline)."""
    base = next((b for b in rows if b["extra_info"].get("baseline")), None)
    if base is None:
        return {}
    return {_impl(b): base["stats"]["median"] / b["stats"]["median"] for b in rows}


def markdown(data: dict, title: str) -> str:
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", platform.processor())
    lines = [f"# {title}", "", f"Measured {data.get('datetime', '')[:19]} UTC on {cpu} "
             f"({info.get('cpu', {}).get('count', '?')} logical CPUs), Python {info.get('python_version', '')}.", ""]
    lines += [f"- {k}: {v}" for k, v in info.get("fastpe", {}).items()] + [""]
    for name, rows in groups(data).items():
        ratio = speedups(rows)
        metrics = [(k, label) for k, label in METRICS if any(k in b["extra_info"] for b in rows)]
        head = ["implementation", "median ms", "IQR ms"] + [label for _, label in metrics]
        base = next((b for b in rows if b["extra_info"].get("baseline")), None)
        memory_key = next((k for k, _ in metrics if k.startswith("peak") and base and k in base["extra_info"]), None)
        if ratio:
            head.append(f"speedup vs {_impl(base)}")
        if memory_key:
            head.append(f"memory vs {_impl(base)}")
        floor = next((b for b in rows if b["extra_info"].get("floor")), None)
        if floor:
            head.append(f"time / {_impl(floor)}")
        lines += [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            cells = [_impl(b), f"{1e3 * b['stats']['median']:.3f}", f"{1e3 * b['stats']['iqr']:.3f}"]
            cells += [f"{b['extra_info'][k]:.4g}" if k in b["extra_info"] else "" for k, _ in metrics]
            if ratio:
                cells.append(f"{ratio[_impl(b)]:.2f}x")
            if memory_key:
                mine = b["extra_info"].get(memory_key)
                cells.append(f"{base['extra_info'][memory_key] / mine:.1f}x less" if mine else "")
            if floor:
                cells.append(f"{b['stats']['median'] / floor['stats']['median']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


PYTORCH_BASELINES = ("torch", "torch_compiled")
FUSED = ("triton", "cuda")


def plot_speedups(data: dict, path: str) -> bool:
    """Bar chart: each fused backend's speedup over the best PyTorch baseline, per benchmark group.
    Returns False when the data holds no group with both (nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, bars = [], {name: [] for name in FUSED}
    for group, rows in groups(data).items():
        by_impl = {_impl(b): b["stats"]["median"] for b in rows}
        best = min((by_impl[n] for n in PYTORCH_BASELINES if n in by_impl), default=None)
        if best is None or not any(n in by_impl for n in FUSED):
            continue
        labels.append(group)
        for name in FUSED:
            bars[name].append(best / by_impl[name] if name in by_impl else 0.0)
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.5))
    height = 0.8 / len(FUSED)
    for i, name in enumerate(FUSED):
        ax.barh([y + i * height for y in range(len(labels))], bars[name], height=height, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([y + height / 2 for y in range(len(labels))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the best PyTorch baseline (eager or torch.compile); 0 = not available")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="Benchmark results")
    parser.add_argument("--note", default="", help="text appended under the tables (how it was run, caveats)")
    parser.add_argument("--plot", help="also write the speedup bar chart (PNG) here")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json_file).read_text())
    text = markdown(data, args.title)
    Path(args.out).write_text(text + (f"\n{args.note.strip()}\n" if args.note else ""))
    if args.plot and not plot_speedups(data, args.plot):
        print(f"no group has both a fused backend and a PyTorch baseline: {args.plot} not written")
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
