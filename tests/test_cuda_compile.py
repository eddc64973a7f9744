"""torch.compile(fullgraph=True) of modules running every fused op with backend="cuda": each op
is one custom operator to dynamo and AOTAutograd, so there is no graph break, and the compiled
module matches eager mode in outputs and gradients. Runs on a GPU (inductor) and on the CPU
through the emulation of the kernels (aot_eager: fake tensors, AOTAutograd, no codegen)."""

import pytest
import torch
from torch import nn

import fastpe
from cuda_target import target  # noqa: F401  (fixture)


class Block(nn.Module):
    def __init__(self, d=32, heads=2, max_len=64, dropout=0.0):
        super().__init__()
        self.rotatory = fastpe.RotatoryEncoding(d, max_len, backend="cuda")
        self.concat = fastpe.ConcatEncoding(d, max_len, table="learnt", backend="cuda")
        self.rmha = fastpe.RelativeMultiheadAttention(d, heads, dropout=dropout, backend="cuda")
        self.rope = fastpe.RotaryMultiheadAttention(d, heads, learnable="angles", max_len=max_len, backend="cuda")

    def forward(self, x, padding_mask):
        x = self.concat(self.rotatory(x))
        a, _ = self.rmha(x, x, x, key_padding_mask=padding_mask, need_weights=False)
        b, _ = self.rope(a, a, a, key_padding_mask=padding_mask, need_weights=False)
        return b


def _inputs(device, b, L, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, d, generator=gen).to(device)
    lengths = torch.randint(1, L + 1, (b,), generator=gen)
    padding = (torch.arange(L)[None, :] < (L - lengths)[:, None]).to(device)
    return x, padding


def _run(fn, model, x, padding):
    """fn (the model or its compiled version) on x; the gradients of model's parameters."""
    model.zero_grad(set_to_none=True)
    y = fn(x, padding)
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_module_has_no_graph_break_and_matches_eager(target):
    torch._dynamo.reset()
    model = Block().to(target.device)
    backend = "aot_eager" if target.emulated else "inductor"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for b, L in ((3, 17), (2, 29)):  # the second shape recompiles (dynamic shapes through the fake impls)
        x, padding = _inputs(target.device, b, L, seed=L)
        y_eager, g_eager = _run(model, model, x, padding)
        y_comp, g_comp = _run(compiled, model, x, padding)
        torch.testing.assert_close(y_comp, y_eager, atol=1e-4, rtol=1e-4)
        assert g_comp.keys() == g_eager.keys()
        for name in g_eager:
            torch.testing.assert_close(g_comp[name], g_eager[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_training_step_with_dropout(target):
    torch._dynamo.reset()
    model = Block(dropout=0.2).to(target.device).train()
    backend = "aot_eager" if target.emulated else "inductor"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x, padding = _inputs(target.device, 3, 17)
    torch.manual_seed(1)
    y1, g1 = _run(compiled, model, x, padding)
    torch.manual_seed(1)
    y2, g2 = _run(compiled, model, x, padding)
    assert torch.equal(y1, y2), "dropout under torch.compile must follow torch.manual_seed"
    for name in g1:
        assert torch.isfinite(g1[name]).all() and torch.equal(g1[name], g2[name])
    y3, _ = _run(compiled, model, x, padding)
    assert not torch.equal(y1, y3)
