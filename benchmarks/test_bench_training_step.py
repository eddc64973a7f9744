"""End to end: one CARCA training step (negatives, forward, loss, backward, Adam) per encoding,
backend and step kind (eager, torch.compile, one CUDA graph), as sequences/s and peak memory.

On a GPU the shape is Beauty-sized (128 sequences, L=75, d=90, 3 blocks, 1 head, bf16 autocast):
there a step is bound by launch overhead, so the step kind matters as much as the kernels. The
baseline of each group is the ``reference`` backend's eager step where the encoding has a fused
op, else the ``torch`` eager step. On the CPU the suite is a smoke test on a tiny model.

    pytest benchmarks/test_bench_training_step.py --benchmark-only          # on a GPU
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runner import DEVICE, HAS_CUDA
from timing import Rotating, peak_cuda_mib

from fastpe.backends import BackendUnavailableError
from fastpe.data import synthetic_dataset
from fastpe.data.split import epoch_batches
from fastpe.train import TrainConfig
from fastpe.train.trainer import Run, _batch_tensors, make_optimizer

# Encodings whose modules have a fused op (backend matters); the others use plain SDPA attention.
FUSED_ENCODINGS = ("abs+con", "learnt+con", "rotatory", "rotatory+con", "rmha-4", "rope")
PLAIN_ENCODINGS = ("none", "abs", "learnt")

if HAS_CUDA:
    SHAPE = dict(batch_size=128, max_len=75, d_model=90, n_blocks=3, n_heads=1)
    DATA = dict(n_users=1024, n_items=12000, min_len=60, max_len=90)
    ENCODINGS = PLAIN_ENCODINGS + FUSED_ENCODINGS
    BACKENDS = ("reference", "torch", "triton", "cuda")
    STEPS = ("eager", "graphed")
    # torch.compile costs tens of seconds per model: compile the two encodings that bracket the range.
    COMPILED = {("none", "torch"), ("rmha-4", "torch"), ("rmha-4", "triton"), ("rmha-4", "cuda")}
else:
    SHAPE = dict(batch_size=8, max_len=12, d_model=16, n_blocks=1, n_heads=2)
    DATA = dict(n_users=40, n_items=50, min_len=8, max_len=16)
    ENCODINGS = ("none", "rotatory+con", "rmha-4", "rope")
    BACKENDS = ("reference", "torch")
    STEPS = ("eager",)
    COMPILED = set()
BATCHES = 4  # distinct batches the timed loop rotates through


def cases():
    for encoding in ENCODINGS:
        backends = BACKENDS if encoding in FUSED_ENCODINGS else ("torch",)
        for backend in backends:
            for kind in STEPS + (("compiled",) if (encoding, backend) in COMPILED else ()):
                yield pytest.param(encoding, backend, kind, id=f"{encoding}-{backend}-{kind}")


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(**DATA, seed=0)


@pytest.mark.parametrize("encoding, backend, kind", list(cases()))
def test_carca_training_step(benchmark, dataset, encoding, backend, kind):
    cfg = TrainConfig(encoding=encoding, backend=backend, dropout=0.1, negatives=1, warmup_steps=0, epochs=1,
                      progress=False, cuda_graphs=kind == "graphed", eval_negatives=20, full_ranking=False,
                      valid_users=16, threads=0 if HAS_CUDA else 1, **SHAPE)
    try:
        run = Run(cfg, dataset, log=lambda *a: None)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    model = run.model.train()
    optimizer = make_optimizer(cfg, model, run.device, graphed=kind == "graphed")
    step = run.make_step(kind, model, optimizer)
    rng = np.random.default_rng(1)
    batches = []
    for batch in epoch_batches(run.split, cfg.batch_size, cfg.max_len, run.mode, rng, 4):
        batches.append(_batch_tensors(batch, run.device, run.use_context))
        if len(batches) == BATCHES:
            break
    for b in batches:  # warm-up: compiles or captures the step, and checks it trains
        loss = step(*b)
    assert torch.isfinite(loss), f"{encoding}/{backend}/{kind}: non-finite loss"

    amp = "bf16" if run.amp_dtype == torch.bfloat16 else "fp32"
    group = (f"CARCA train step {encoding} B={cfg.batch_size} L={cfg.max_len} d={cfg.d_model} "
             f"blocks={cfg.n_blocks} {amp}")
    impl = f"{backend}/{kind}"
    baseline = ("reference" if encoding in FUSED_ENCODINGS else "torch") + "/eager"
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, baseline=impl == baseline, encoding=encoding, backend=backend, step=kind,
                                batch_size=cfg.batch_size, op="carca-train-step")
    if HAS_CUDA and not benchmark.disabled:
        benchmark.extra_info["peak_mib"] = peak_cuda_mib(lambda: step(*batches[0]))
    benchmark(Rotating(step, batches))
    if not benchmark.disabled:
        benchmark.extra_info["seq_per_s"] = cfg.batch_size / benchmark.stats.stats.median
