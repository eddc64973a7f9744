"""The shared memory the relative-attention kernels ask for, from their own layout code (compiled
for the host): the time-interval kernels with K = 256 (R = 257 buckets) fit an sm_80/sm_90 block
(227 KiB) at the study's head sizes, two blocks per H100/H200 SM in 16 bit, and the RMHA-4
kernels stay where they were."""

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

BLOCK_LIMIT = 227 * 1024
TWO_PER_SM = (228 * 1024) // 2 - 1024  # an H100/H200 SM holds 228 KiB, 1 KiB reserved per block


@pytest.fixture(scope="module")
def layouts():
    if shutil.which("g++") is None or shutil.which("nvcc") is None:
        pytest.skip("g++ and the CUDA headers (nvcc) are needed")
    import cuda_relattn_static

    return cuda_relattn_static.layouts(ROOT / "csrc", new_layout=True)


@pytest.mark.parametrize("dh", [32, 64, 90])
def test_time_interval_kernels_fit_with_257_buckets(layouts, dh):
    for dtype in ("bf16", "fp16", "fp32"):
        fwd, bwd, *_ = layouts[(dtype, 257, dh)]
        assert fwd <= BLOCK_LIMIT and bwd <= BLOCK_LIMIT, (dtype, dh, fwd, bwd)
        if dtype != "fp32":
            assert fwd <= TWO_PER_SM and bwd <= TWO_PER_SM, (dtype, dh, fwd, bwd)


@pytest.mark.parametrize("dh", [32, 64, 90])
def test_rmha_kernels_keep_two_blocks_per_sm(layouts, dh):
    for dtype in ("bf16", "fp16", "fp32"):
        fwd, bwd, *_ = layouts[(dtype, 9, dh)]
        assert fwd <= TWO_PER_SM and bwd <= TWO_PER_SM, (dtype, dh, fwd, bwd)
