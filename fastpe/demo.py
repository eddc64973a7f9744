"""A quick tour: every encoding on one synthetic batch, with timings, printed as a table."""

from __future__ import annotations

import time

import torch

from fastpe.backends import resolve_backend
from fastpe.nn.factory import ENCODINGS, attention_layer, input_encoding


def run_demo(batch: int = 32, length: int = 50, d_model: int = 64, num_heads: int = 2, device: str = "cpu", repeats: int = 3) -> list[dict]:
    """Encode a left-padded batch with every encoding, then one self-attention layer; time fwd+bwd."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, d_model, generator=gen).to(device)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen).to(device)
    padding = torch.arange(length, device=device)[None, :] < (length - lengths)[:, None]
    rows = []
    for name in ENCODINGS:
        torch.manual_seed(0)
        encoding = input_encoding(name, d_model, max_len=length).to(device)
        attention = attention_layer(name, d_model, num_heads).to(device)
        params = sum(p.numel() for p in [*encoding.parameters(), *attention.parameters()])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            h = encoding(x, padding_mask=padding)
            out, _ = attention(h, h, h, key_padding_mask=padding, need_weights=False)
            out.square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "encoding": name,
                "module": f"{type(encoding).__name__} + {type(attention).__name__}",
                "parameters": params,
                "fwd+bwd ms": 1e3 * min(times),
                "output std": float(out.detach()[~padding].std()),
                "finite": bool(torch.isfinite(out).all()),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as a GitHub-markdown table (floats with 3 decimals)."""
    headers = list(rows[0])
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(c) for c in cells)])


def main(args) -> int:
    rows = run_demo(args.batch, args.length, args.d_model, args.heads, args.device)
    backend = resolve_backend("auto", "relative_attention", torch.device(args.device))
    print(f"fastpe demo: B={args.batch}, L={args.length}, d={args.d_model}, heads={args.heads}, "
          f"device={args.device}, relative-attention backend={backend}")
    print(format_table(rows))
    return 0 if all(r["finite"] for r in rows) else 1
