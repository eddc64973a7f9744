"""Shared pytest setup for tests/ and benchmarks/."""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Without a GPU, Triton kernels run on the CPU through the interpreter. It must be set before any
# kernel is defined (fastpe defines them lazily, on first use of backend="triton").
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (-n N) the workers share the cores: each gets its share of intra-op threads
# instead of all of them, which would oversubscribe the machine N times over.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Benchmarks run for real only when asked (--benchmark-only / --benchmark-enable); otherwise
    # each benchmark body runs once as a smoke test. Set before pytest-benchmark reads it.
    if not (config.getoption("benchmark_only") or config.getoption("benchmark_enable")):
        config.option.benchmark_disable = True
    if HAS_CUDA:
        # GPU work is asynchronous: time loops with a clock that synchronizes the device first.
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "benchmarks"))
        config.option.benchmark_timer = "timing.cuda_synchronized_perf_counter"


def pytest_benchmark_update_machine_info(config, machine_info):
    # Every benchmark JSON records the software and card it was measured with.
    info = {"torch": torch.__version__, "cuda runtime": torch.version.cuda or "none"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            pass
    machine_info["fastpe"] = info


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
