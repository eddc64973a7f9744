"""One GPU run for the cuda backend: build the extension, check it against the torch backend at
the study's shapes, and time forward+backward against the other backends and SDPA.

    python benchmarks/cuda_check.py [--out DIR] [--quick]

Writes DIR/cuda_check.md (a markdown table) and prints it. Run the GPU tests separately:

    python -m pytest tests/test_cuda_relative_attention.py tests/test_cuda_rotary.py \
        tests/test_cuda_concat_projection.py tests/test_cuda_compile.py -q -x -m gpu
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastpe
from fastpe import _ext
from fastpe.backends import unavailable_reason
from fastpe.ops import concat_projection, relative_attention, rotary, rotatory


def bench(fn, reps=50, warmup=10):
    """Median milliseconds of fn() (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def fused_backends(op):
    out = []
    for name in ("cuda", "triton"):
        if unavailable_reason(name, torch.device("cuda")) is None:
            module = _ext if name == "cuda" else __import__("fastpe.kernels.triton", fromlist=["x"])
            if op in getattr(module, "IMPLEMENTED_OPS", ()):
                out.append(name)
    return out


def padding_mask(b, L, gen):
    lengths = torch.randint(max(1, L // 4), L + 1, (b,), generator=gen)
    return (torch.arange(L)[None, :] < (L - lengths)[:, None]).cuda()


def rmha_rows(quick):
    shapes = [(512, 2, 50, 32, torch.bfloat16), (512, 2, 50, 32, torch.float32), (256, 2, 200, 64, torch.bfloat16),
              (128, 1, 75, 90, torch.bfloat16)]
    if quick:
        shapes = shapes[:1]
    rows = []
    for b, h, L, dh, dtype in shapes:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, L, dh, generator=gen).cuda().to(dtype).requires_grad_() for _ in range(3))
        rk, rv = (torch.randn(9, dh, generator=gen).cuda().to(dtype).mul_(0.3).requires_grad_() for _ in range(2))
        kpm = padding_mask(b, L, gen)
        grad = torch.randn(b, h, L, dh, generator=gen).cuda().to(dtype)
        ref = relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend="torch")
        got = relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend="cuda")
        err = (got.float() - ref.float()).abs().max().item()
        bias = torch.zeros(b, 1, 1, L, device="cuda", dtype=dtype).masked_fill(kpm[:, None, None, :], float("-inf"))

        def step(backend):
            def run():
                for t in (q, k, v, rk, rv):
                    t.grad = None
                relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend=backend).backward(grad)
            return run

        def fwd(backend):
            return lambda: relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend=backend)

        def sdpa_step():
            for t in (q, k, v):
                t.grad = None
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias).backward(grad)

        cells = {"torch": bench(step("torch"))}
        for name in fused_backends("relative_attention"):
            cells[name] = bench(step(name))
            cells[f"{name} fwd"] = bench(fwd(name))
        cells["sdpa (same mask, no positions)"] = bench(sdpa_step)
        rows.append((f"rmha fwd+bwd B={b} h={h} L={L} dh={dh} {str(dtype)[6:]}", err, cells))
    return rows


def rotary_rows(quick):
    rows = []
    b, L, h, dh, dtype = 512, 50, 2, 32, torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, L, h, dh, generator=gen).cuda().to(dtype).requires_grad_()
    angles = torch.randn(L, dh // 2, generator=gen).cuda().requires_grad_()
    grad = torch.randn(b, L, h, dh, generator=gen).cuda().to(dtype)
    err = (rotary(x, angles, backend="cuda").float() - rotary(x, angles, backend="torch").float()).abs().max().item()

    def step(backend):
        def run():
            x.grad = angles.grad = None
            rotary(x, angles, backend=backend).backward(grad)
        return run

    cells = {"torch": bench(step("torch")), "clone": bench(lambda: x.detach().clone())}
    for name in fused_backends("rotary"):
        cells[name] = bench(step(name))
    rows.append((f"rotary fwd+bwd B={b} L={L} h={h} dh={dh} bf16", err, cells))

    x2 = torch.randn(b, L, 64, generator=gen).cuda().to(dtype).requires_grad_()
    a2 = torch.randn(L, 32, generator=gen).cuda().requires_grad_()
    g2 = torch.randn(b, L, 64, generator=gen).cuda().to(dtype)
    err = (rotatory(x2, a2, backend="cuda").float() - rotatory(x2, a2, backend="torch").float()).abs().max().item()

    def step2(backend):
        def run():
            x2.grad = a2.grad = None
            rotatory(x2, a2, mode="add", backend=backend).backward(g2)
        return run

    cells = {"torch": bench(step2("torch")), "clone": bench(lambda: x2.detach().clone())}
    for name in fused_backends("rotatory_add"):
        cells[name] = bench(step2(name))
    rows.append((f"rotatory add fwd+bwd B={b} L={L} d=64 bf16", err, cells))
    return rows


def concat_rows(quick):
    rows = []
    for b, L, d, dtype in [(128, 75, 90, torch.bfloat16), (512, 50, 64, torch.bfloat16)][: 1 if quick else 2]:
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(b, L, d, generator=gen).cuda().to(dtype).requires_grad_()
        table = torch.randn(L, d, generator=gen).cuda().to(dtype).requires_grad_()
        w = (torch.randn(d, 2 * d, generator=gen) * 0.1).cuda().to(dtype).requires_grad_()
        bias = torch.randn(d, generator=gen).cuda().to(dtype).requires_grad_()
        grad = torch.randn(b, L, d, generator=gen).cuda().to(dtype)
        got = concat_projection(x, table, w, bias, backend="cuda")
        err = (got.float() - concat_projection(x, table, w, bias, backend="torch").float()).abs().max().item()

        def step(backend):
            def run():
                for t in (x, table, w, bias):
                    t.grad = None
                concat_projection(x, table, w, bias, backend=backend).backward(grad)
            return run

        cells = {"torch": bench(step("torch"))}
        for name in fused_backends("concat_projection"):
            cells[name] = bench(step(name))
        rows.append((f"concat-projection fwd+bwd B={b} L={L} d={d} bf16", err, cells))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    t0 = time.time()
    reason = _ext.unavailable_reason()
    build_s = time.time() - t0
    if reason is not None:
        raise SystemExit(f"cuda backend unavailable: {reason}")
    device = torch.cuda.get_device_name()
    rows = rmha_rows(args.quick) + rotary_rows(args.quick) + concat_rows(args.quick)
    columns = []
    for _, _, cells in rows:
        for name in cells:
            if name not in columns:
                columns.append(name)
    lines = [
        f"# cuda backend check on {device} (torch {torch.__version__}, fastpe {fastpe.__version__})",
        "",
        f"Extension load/build: {build_s:.1f} s. Median ms (CUDA events); max |cuda - torch| of the forward.",
        "",
        "| case | max abs err | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for label, err, cells in rows:
        lines.append(f"| {label} | {err:.2e} | " + " | ".join(f"{cells[c]:.3f}" if c in cells else "-" for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.md").write_text(text)


if __name__ == "__main__":
    main()
