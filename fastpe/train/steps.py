"""The training step: sampled-negative BCE, and its eager, compiled and CUDA-graphed forms.

One step = sample negatives on the device, forward, loss, backward, optimizer step. The step
never reads a value back to the host, so it can be captured whole in a CUDA graph: static input
buffers of a fixed batch size and length, negatives drawn with the device's RNG inside the
graph, a capturable optimizer whose learning rate lives in a device tensor.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def sampled_bce_loss(model, items, context, targets, target_context, n_items: int, n_negatives: int,
                     generator: torch.Generator | None, per_position: bool, n_targets: torch.Tensor | None = None,
                     shard: tuple[int, int] = (0, 1), timestamps: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of each target against ``n_negatives`` uniformly sampled items.

    targets ``[B, T]`` (0 = no target). Negatives are drawn on the targets' device from
    ``1..n_items``; one that equals the target or any item of its row (the profile) is left out
    of the loss instead of being redrawn, so the step needs no host synchronisation. Per target:
    ``softplus(-s_pos) + mean(softplus(s_neg))``; the loss is the mean over targets.

    Data parallel (``shard = (rank, world)``, world > 1): the rows are this rank's contiguous
    ``1/world`` of the global batch. The negatives are drawn for the whole global batch (every rank
    draws the same) and this rank's rows taken, so together the ranks use exactly the negatives of
    one process. The loss is this rank's sum over targets divided by ``n_targets`` (a 0-d tensor:
    the global batch's number of targets) times ``world``: DDP averages the gradients over ranks,
    which then equal those of the global mean.
    """
    rank, world = shard
    b, t = targets.shape
    negatives = torch.randint(1, n_items + 1, (b * world, t, n_negatives), device=targets.device, generator=generator)
    if world > 1:
        negatives = negatives[rank * b:(rank + 1) * b]
    candidates = torch.cat([targets.unsqueeze(-1), negatives], dim=-1)
    times = {} if timestamps is None else {"timestamps": timestamps}  # [B, L], for time-aware encodings (tisas)
    logits = model(items, context, candidates, target_context, per_position, **times).float()
    has_target = targets != 0
    seen = torch.cat([items, targets], dim=1)
    clash = (negatives.unsqueeze(-1) == seen[:, None, None, :]).any(dim=-1)
    usable = ~clash & has_target.unsqueeze(-1)
    positive_term = F.softplus(-logits[..., 0])
    negative_term = (F.softplus(logits[..., 1:]) * usable).sum(-1) / usable.sum(-1).clamp(min=1)
    per_target = (positive_term + negative_term) * has_target
    if world > 1:
        return per_target.sum() / n_targets * world
    return per_target.sum() / has_target.sum().clamp(min=1)


def autocast(device: torch.device, dtype: torch.dtype | None, graph_safe: bool = False):
    if dtype is None:
        return contextlib.nullcontext()
    # CUDA graphs need the autocast cache off (cached casts would be freed between replays).
    return torch.autocast(device.type, dtype=dtype, cache_enabled=not graph_safe)


class EagerStep:
    """``step(*batch) -> loss`` (a device tensor): zero grads, loss, backward, clip, optimizer step."""

    name = "eager"

    def __init__(self, loss_fn, model, optimizer, device, amp_dtype=None, clip_grad: float = 0.0):
        self.loss_fn, self.model, self.optimizer = loss_fn, model, optimizer
        self.device, self.amp_dtype, self.clip_grad = device, amp_dtype, clip_grad
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _step(self, batch, graph_safe: bool = False):
        with autocast(self.device, self.amp_dtype, graph_safe):
            loss = self.loss_fn(*batch)
        loss.backward()
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad, foreach=self.device.type == "cuda")
        self.optimizer.step()
        return loss.detach()

    def __call__(self, *batch):
        self.optimizer.zero_grad(set_to_none=True)
        return self._step(batch)


class CompiledStep(EagerStep):
    """The same step with the forward and loss (and, through AOTAutograd, the backward) compiled
    by ``torch.compile``; shapes are static (fixed batch size and length), so it compiles once."""

    name = "compiled"

    def __init__(self, loss_fn, model, optimizer, device, amp_dtype=None, clip_grad: float = 0.0,
                 compile_backend: str = "inductor"):
        super().__init__(torch.compile(loss_fn, dynamic=False, backend=compile_backend), model, optimizer, device,
                         amp_dtype, clip_grad)


class CudaGraphStep(EagerStep):
    """The whole step (negatives, forward, backward, optimizer) captured in one CUDA graph.

    The first ``warmup`` calls run eagerly on a side stream (they are real training steps, as
    capture requires warmed-up allocations and optimizer state); the next call captures the graph
    and every call replays it after copying the batch into static buffers. Needs a CUDA device,
    an optimizer built with ``capturable=True`` and a tensor learning rate, and ``generator=None``
    in the loss (the default CUDA generator is graph-safe).
    """

    name = "graphed"

    def __init__(self, loss_fn, model, optimizer, device, amp_dtype=None, clip_grad: float = 0.0, warmup: int = 3):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CUDA graphs need a CUDA device (got {device}); use the eager or compiled step on the CPU")
        for group in optimizer.param_groups:
            if not group.get("capturable", False) and not group.get("fused", False):
                raise ValueError("CUDA graph capture needs an optimizer built with capturable=True (or fused=True)")
        super().__init__(loss_fn, model, optimizer, device, amp_dtype, clip_grad)
        self.warmup = warmup
        self.calls = 0
        self.graph = None
        self.static = None
        self.static_loss = None

    def __call__(self, *batch):
        if self.static is None:
            self.static = [None if t is None else t.clone() for t in batch]
        else:
            for dst, src in zip(self.static, batch):
                if dst is not None:
                    dst.copy_(src, non_blocking=True)
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step(self.static, graph_safe=True)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # backward allocates .grad from the graph's pool
            with torch.cuda.graph(self.graph):
                self.static_loss = self._step(self.static, graph_safe=True)
        self.graph.replay()
        return self.static_loss.clone()


STEPS = {"eager": EagerStep, "compiled": CompiledStep, "graphed": CudaGraphStep}
