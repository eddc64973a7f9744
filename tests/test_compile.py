"""torch.compile(fullgraph=True) of every module on the CPU: same outputs and gradients as eager.

Compile time dominates, so every module is compiled once with the ``aot_eager`` backend (dynamo
capture plus AOT autograd, which is where graph breaks and tracing errors show) and a
representative few with the default ``inductor`` backend, which also generates code.
fullgraph=True turns any graph break into an error.
"""

import copy

import pytest
import torch
import torch._dynamo

import fastpe
from module_zoo import B, D, H, L, MAX_LEN, Wrapped, all_modules, left_padding

INDUCTOR_CASES = ("rmha-4", "rope", "rotatory+con")


def _fresh(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    module = Wrapped(all_modules()[name]).eval()
    with torch.no_grad():  # a trained-looking module: non-zero biases and tables
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def _run(fn, module, x, pad):
    """``fn(x, pad)``, the gradient of x and of every parameter of ``module`` (which ``fn`` runs)."""
    x = x.detach().clone().requires_grad_()
    out = fn(x, pad)
    out.backward(torch.ones_like(out) + torch.linspace(0, 1, out.numel()).view_as(out))
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def assert_compiled_matches_eager(name, backend, tol, x=None, pad=None):
    eager = _fresh(name)
    compiled_module = copy.deepcopy(eager)
    torch._dynamo.reset()  # the zoo shares forward code objects: keep each case's guards apart
    compiled = torch.compile(compiled_module, fullgraph=True, backend=backend)
    x = torch.randn(B, L, D) if x is None else x
    pad = left_padding() if pad is None else pad
    out_e, dx_e, grads_e = _run(eager, eager, x, pad)
    out_c, dx_c, grads_c = _run(compiled, compiled_module, x, pad)
    torch.testing.assert_close(out_c, out_e, rtol=tol, atol=tol, msg=lambda m: f"{name} output: {m}")
    torch.testing.assert_close(dx_c, dx_e, rtol=tol, atol=tol, msg=lambda m: f"{name} grad x: {m}")
    assert grads_c.keys() == grads_e.keys()
    for pname, g in grads_e.items():
        assert (g is None) == (grads_c[pname] is None), f"{name}: gradient of {pname} present in only one run"
        if g is not None:
            torch.testing.assert_close(grads_c[pname], g, rtol=tol, atol=tol, msg=lambda m, p=pname: f"{name} grad {p}: {m}")


@pytest.mark.parametrize("name", sorted(all_modules()))
def test_aot_eager_fullgraph_matches_eager(name):
    assert_compiled_matches_eager(name, "aot_eager", 1e-6)


@pytest.mark.parametrize("name", INDUCTOR_CASES)
def test_inductor_fullgraph_matches_eager(name):
    assert_compiled_matches_eager(name, "inductor", 2e-5)


def test_attention_mask_forms_compile_without_graph_breaks():
    """Float and bool masks of every shape nn.MultiheadAttention takes, need_weights on and off."""
    layer = fastpe.RelativeMultiheadAttention(D, H).eval()
    x = torch.randn(B, L, D)
    pad = left_padding()
    masks = [
        {"key_padding_mask": torch.zeros(B, L).masked_fill(pad, -1e4)},
        {"attn_mask": torch.randn(B * H, L, L) > 0.5},
        {"attn_mask": torch.randn(B, 1, L, L)},
        {"key_padding_mask": pad, "is_causal": True, "need_weights": True},
    ]
    for kwargs in masks:
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        kwargs.setdefault("need_weights", False)
        torch.testing.assert_close(compiled(x, x, x, **kwargs)[0], layer(x, x, x, **kwargs)[0], rtol=1e-6, atol=1e-6)


def test_training_mode_with_dropout_compiles():
    layer = fastpe.RotaryMultiheadAttention(D, H, dropout=0.2, learnable="angles", max_len=MAX_LEN).train()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, L, D, requires_grad=True)
    out, _ = compiled(x, x, x, key_padding_mask=left_padding(), need_weights=False)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert layer.angle_weight.grad is not None


def test_dynamic_shapes_compile_once_for_several_lengths():
    enc = fastpe.input_encoding("rotatory+con", D, MAX_LEN)
    attn = fastpe.RelativeMultiheadAttention(D, H).eval()

    def step(x, pad):
        y = enc(x, padding_mask=pad)
        return attn(y, y, y, key_padding_mask=pad, need_weights=False, is_causal=True)[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, (b, length) in enumerate(((2, 5), (3, 9), (4, 12))):
        x, pad = torch.randn(b, length, D), left_padding(b, length)
        # After the first call, a new batch size or length must reuse the graph.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            torch.testing.assert_close(compiled(x, pad), step(x, pad), rtol=1e-6, atol=1e-6)
