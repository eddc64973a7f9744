"""The benchmark suite's tooling works on the CPU: a real pytest-benchmark run turns into the
markdown report, the summary table and the speedup plot the GPU script writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402
import report  # noqa: E402


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_bench_concat.py", "benchmarks/test_bench_rmha.py",
         "benchmarks/test_bench_training_step.py", "-q",
         "--benchmark-enable", "--benchmark-max-time=0.01", "--benchmark-min-rounds=2", f"--benchmark-json={path}",
         "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, env=gpu_suite.own_run_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(path.read_text())


def test_report_has_a_table_per_group_with_baseline_and_floor(bench_json):
    text = report.markdown(bench_json, "t")
    assert "## rmha-4 fwd+bwd B=3 h=2 L=9 dh=8 fp32" in text
    assert "speedup vs torch" in text and "time / sdpa_no_pos_masked" in text and "time / linear" in text
    assert "- torch: " in text  # versions recorded by conftest's machine-info hook
    rmha = report.groups(bench_json)["rmha-4 fwd B=3 h=2 L=9 dh=8 fp32"]
    assert {report._impl(b) for b in rmha} >= {"torch", "direct_port", "sdpa_no_pos", "sdpa_no_pos_masked"}
    assert report.speedups(rmha)["torch"] == pytest.approx(1.0)


def test_summary_and_plot_with_a_fused_backend(bench_json, tmp_path):
    data = json.loads(json.dumps(bench_json))
    for bench in list(data["benchmarks"]):  # pretend a fused backend ran at half the torch time
        if report._impl(bench) == "torch":
            fused = json.loads(json.dumps(bench))
            fused["extra_info"].update(impl="triton", baseline=False)
            fused["stats"]["median"] /= 2
            data["benchmarks"].append(fused)
    rows = gpu_suite.summary_rows(data)
    assert rows and all("CARCA" not in r["benchmark"] for r in rows)
    assert all(r["speedup"] == pytest.approx(2.0) for r in rows)
    assert gpu_suite.print_summary(rows).startswith("| benchmark | best PyTorch ms | triton ms")
    png = tmp_path / "speedup.png"
    assert report.plot_speedups(data, str(png)) and png.stat().st_size > 1000


def test_gpu_suite_says_so_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "no CUDA GPU" in result.stdout


def test_auto_preferences_from_measurements(bench_json):
    data = json.loads(json.dumps(bench_json))
    for bench in list(data["benchmarks"]):  # pretend both fused backends ran beside torch
        if report._impl(bench) == "torch" and bench["extra_info"]["mode"] == "fwd+bwd":
            for name, factor in (("triton", 0.5), ("cuda", 0.4 if bench["extra_info"]["op"] == "rmha-4" else 0.6)):
                fused = json.loads(json.dumps(bench))
                fused["extra_info"].update(impl=name, baseline=False)
                fused["stats"]["median"] *= factor
                data["benchmarks"].append(fused)
    order = gpu_suite.auto_preferences(data)
    assert order["relative_attention"] == {"L<=64,dh<=64": ["cuda", "triton"]}  # B=3 h=2 L=9 dh=8
    assert order["concat_projection"] == {"any": ["triton", "cuda"]}
    assert gpu_suite.auto_preferences(bench_json) == {}  # no fused backend measured: keep the default


def test_training_step_benchmark_reports_sequences_per_second(bench_json):
    groups = report.groups(bench_json)
    rmha = groups["CARCA train step rmha-4 B=8 L=12 d=16 blocks=1 fp32"]
    assert {report._impl(b) for b in rmha} == {"reference/eager", "torch/eager"}
    for b in rmha:
        assert b["extra_info"]["seq_per_s"] == pytest.approx(8 / b["stats"]["median"])
    assert "| torch/eager |" in report.markdown(bench_json, "t") and "sequences/s" in report.markdown(bench_json, "t")
    rows = {r["training step"]: r for r in gpu_suite.training_rows(bench_json)}
    assert rows["CARCA train step none B=8 L=12 d=16 blocks=1 fp32"]["torch/eager seq/s"] > 0
    assert len(rows) == 4


def test_planner_choices_are_summarised_apart_with_their_fastest_variant(bench_json):
    data = json.loads(json.dumps(bench_json))
    template = next(b for b in data["benchmarks"] if report._impl(b) == "torch")
    for label, median in (("default", 2.0e-3), ("by column", 1.5e-3)):
        bench = json.loads(json.dumps(template))
        bench["group"] = "choice: rmha fwd S3, band tiles by column"
        bench["extra_info"] = dict(op="planner-choice", impl=label, baseline=label == "default", mode="fwd")
        bench["stats"]["median"] = median
        data["benchmarks"].append(bench)
    assert all("choice" not in r["benchmark"] for r in gpu_suite.summary_rows(data))
    [row] = gpu_suite.choice_rows(data)
    assert row["planner choice"] == "rmha fwd S3, band tiles by column" and row["fastest"] == "by column"
    assert row["default ms"] == pytest.approx(2.0) and row["default / fastest"] == pytest.approx(4 / 3)


def test_every_planner_choice_names_knobs_its_planner_knows():
    """A misspelt knob would only fail on the GPU, after minutes of the session: plan each
    variant here (CPU tensors, the planners only read shapes and flags)."""
    import torch

    import test_bench_choices as choices
    from fastpe.kernels.triton import concat, interval, rmha

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    for (name, op, shape, _mode, variants) in choices.CASES:
        assert set(variants) >= {"default"} and len(variants) >= 2 and op in choices.IMPLS, name
        for knobs in variants.values():
            with choices.planner_overrides(knobs):
                if op == "rmha":
                    b, h, length, dh = shape
                    rmha.fwd_config(b, h, length, length, dh, dh, cpu, bf16)
                    rmha.bwd_config(b, h, length, length, dh, dh, cpu, bf16)
                elif op == "tisas":
                    b, h, length, dh = shape
                    interval.fwd_config(b, h, length, dh, dh, cpu)
                    interval.bwd_config(b, h, length, dh, dh, cpu)
                else:
                    b, length, d = shape
                    x, table, weight = torch.zeros(b, length, d), torch.zeros(length, d), torch.zeros(d, 2 * d)
                    concat.plan_forward(x, table, weight, None, None)
                    concat.plan_backward(torch.zeros_like(x), x, table, weight, None, False)


def test_gpu_suite_rehearsal_on_the_cpu_writes_every_output(tmp_path):
    # The whole flow of the GPU script (one pytest run per benchmark file, merged JSON, report,
    # summary tables) on the CPU's smoke shapes, so the script is known to work before a GPU session.
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--cpu", "--out", str(tmp_path),
                             "--max-time", "0.001", "--only", "not compiled and not flex and not triton"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    ops = {b["extra_info"].get("op") for b in data["benchmarks"]}
    assert {"carca-train-step", "concat-projection"} <= ops and len(ops) >= 4
    text = (tmp_path / "gpu.md").read_text()
    assert "## Summary" in text and "| training step |" in text and "--cpu rehearsal" in text
    assert not list(tmp_path.glob("gpu-*.json"))  # the per-file parts are merged away
