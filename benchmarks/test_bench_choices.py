"""Planner choices the static sm_90a report could not settle, timed against each other on a GPU.

``benchmarks/static_report.py`` counts instructions, spills and bytes; it cannot see latency.
Where it rated two configurations of a Triton kernel close, or traded instructions for spills, both
are listed here and timed in one run (the alternative as a ``fastpe.kernels.triton._launch.override``
of the planner's knobs). ``gpu_suite.py`` lists the fastest of each group in gpu.md ("Planner
choices"): a winner that is not ``default`` is a change to make in the planner (``fwd_config`` /
``bwd_config``), with its numbers. Without a GPU every case skips.

    pytest benchmarks/test_bench_choices.py --benchmark-only          # on a GPU
"""

import contextlib
import json

import pytest
import torch

from baselines import concat_impl, concat_inputs, rmha_impl, rmha_inputs, tisas_impl, tisas_inputs
from runner import DEVICE, HAS_CUDA, INPUT_SETS, make_impl, run_op_benchmark

S2, S3 = (256, 2, 200, 64), (128, 1, 75, 90)
# (what is decided, op, shape, mode, {label: {planner: knobs}}); "default" is the planner's own.
# Shapes: (B, h, L, dh) for the attention ops, (B, L, d) for concat-projection.
CASES = [
    ("rmha fwd S2, key padding read as packed bits", "rmha", S2, "fwd",
     {"default": {}, "padding bytes per tile": {"rmha_fwd": {"key_bits": 0}}}),
    ("rmha fwd+bwd S2, backward key padding as packed bits (more spills)", "rmha", S2, "fwd+bwd",
     {"default": {}, "backward padding bytes per tile": {"rmha_bwd": {"key_bits": 0}}}),
    ("rmha fwd S2, left-of-band mask as a float tile (fewer instructions, 2 CTAs per SM instead of 3)",
     "rmha", S2, "fwd", {"default": {}, "predicates": {"rmha_fwd": {"left_float": 0}}}),
    ("rmha fwd S3, band tiles by column (three key blocks: fewer instructions, more registers)", "rmha", S3, "fwd",
     {"default": {}, "gathered band tiles": {"rmha_fwd": {"diag": 0}}}),
    ("rmha fwd+bwd S3, backward 64-row blocks on 4 warps (fewer spills, half the warps)", "rmha", S3, "fwd+bwd",
     {"default": {}, "64 x 64 on 4 warps": {"rmha_bwd": {"block_m": 64, "num_warps": 4}}}),
    ("tisas fwd S2, 4 warps (fewer instructions, spills)", "tisas", S2, "fwd",
     {"default": {}, "4 warps": {"tisas_fwd": {"num_warps": 4}}}),
    ("tisas fwd+bwd S2, 64-row backward blocks (fewer instructions, spills)", "tisas", S2, "fwd+bwd",
     {"default": {}, "64-row blocks": {"tisas_bwd": {"block_m": 64}}}),
    # 150 CTAs of 64 rows put two on 18 SMs; 75 of 128 rows model 1.08 -> 0.88 us (spilling 32 B),
    # but leave 57 SMs idle, whose share of the memory bandwidth the model does not see. Unrolled
    # K loops (the default) model 2.31 -> 1.08 us but lose the loops' software pipelining.
    ("concat fwd S3 (d 90), 128-row tiles / K loops", "concat", (128, 75, 90), "fwd",
     {"default": {}, "128-row tiles": {"concat_gemm": {"block_m": 128}},
      "K loops, not unrolled": {"concat_gemm": {"unroll": 0}}}),
]
IMPLS = {"rmha": (rmha_impl, rmha_inputs), "tisas": (tisas_impl, tisas_inputs), "concat": (concat_impl, concat_inputs)}
VARIANTS = [(case, label) for case in CASES for label in case[4]]


@contextlib.contextmanager
def planner_overrides(knobs: dict):
    from fastpe.kernels.triton import _launch

    with contextlib.ExitStack() as stack:
        for planner, values in knobs.items():
            stack.enter_context(_launch.override(planner, **values))
        yield


@pytest.mark.parametrize("case,label", VARIANTS, ids=[f"{c[0]} [{label}]" for c, label in VARIANTS])
def test_planner_choice(benchmark, case, label):
    if not HAS_CUDA:
        pytest.skip("planner choices are timed on a GPU only")
    name, op, shape, mode, variants = case
    impl, make_inputs = IMPLS[op]
    fn = make_impl(impl, "triton", DEVICE)
    inputs = [make_inputs(*shape, torch.bfloat16, DEVICE, seed) for seed in range(INPUT_SETS)]
    knobs = variants[label]
    # (the plans are cached per override set, and the backward is planned inside the timed calls)
    with planner_overrides(knobs):
        run_op_benchmark(
            benchmark, fn, inputs, mode=mode, impl=label, baseline="default", group=f"choice: {name}",
            info=dict(op="planner-choice", shape=list(shape), dtype="bf16", knobs=json.dumps(knobs)),
        )
