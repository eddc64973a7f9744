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

METRICS = (("peak_extra_mib", "peak extra MiB"), ("peak_mib", "peak MiB"), ("gbps", "GB/s"), ("tflops", "TFLOP/s"))


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
        lines += [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            cells = [_impl(b), f"{1e3 * b['stats']['median']:.3f}", f"{1e3 * b['stats']['iqr']:.3f}"]
            cells += [f"{b['extra_info'][k]:.1f}" if k in b["extra_info"] else "" for k, _ in metrics]
            if ratio:
                cells.append(f"{ratio[_impl(b)]:.2f}x")
            if memory_key:
                mine = b["extra_info"].get(memory_key)
                cells.append(f"{base['extra_info'][memory_key] / mine:.1f}x less" if mine else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="Benchmark results")
    parser.add_argument("--note", default="", help="text appended under the tables (how it was run, caveats)")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json_file).read_text())
    text = markdown(data, args.title)
    Path(args.out).write_text(text + (f"\n{args.note.strip()}\n" if args.note else ""))
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
