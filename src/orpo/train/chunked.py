"""Token log-probs from final hidden states and the output weights, a chunk of rows at a time.

    z = s · (h Wᵀ + b)              the logits of one row (s: the model's logit scale, 1 for most)
    z ← c · tanh(z / c)             only for models with a final logit soft-cap c (Gemma-2)
    log P(y) = z_y − logsumexp(z)

The plain path materializes ``z`` for every target row, ``[rows, vocab]`` (2.1 GB in float32 for
4,096 targets of a 128k vocabulary), then its log-softmax and their gradients. Here no tensor
larger than ``[chunk_size, vocab]`` ever exists: the forward keeps one float per row (the
logsumexp), and the backward recomputes each chunk's logits and turns them into the gradients of
the hidden states, the weight and the bias right away:

    ∂ log P(y) / ∂z = onehot(y) − softmax(z)

The backward pays one extra ``h Wᵀ`` per chunk (4 head matmuls instead of 3). Liger-Kernel's
fused losses avoid it by computing the gradient in the forward, which needs the whole loss inside
the chunk loop; this function returns plain per-token log-probs instead, so every objective (ORPO,
SFT, DPO, ...) uses it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``lm_head``'s output before it is a logit (transformers' own code)."""

    scale: float = 1.0  # Cohere: logit_scale; Granite: 1 / logits_scaling
    softcap: float | None = None  # Gemma-2: final_logit_softcapping

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Same op order as transformers (scale, then divide, tanh, multiply), in place on ``z``."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def grad_factor(self, z: torch.Tensor) -> torch.Tensor | float:
        """``∂z/∂(hWᵀ+b)`` given the transformed logits ``z``: a tensor with a soft-cap, else the scale."""
        if self.softcap is None:
            return self.scale
        # d/dx c·tanh(x/c) = 1 − tanh²(x/c) = 1 − (z/c)²
        return (z / self.softcap).square_().neg_().add_(1.0).mul_(self.scale)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, transform: LogitTransform = LogitTransform(),
                        chunk_size: int = 1024, dtype: torch.dtype | None = None) -> torch.Tensor:
    """float32 ``log P(targets[i])`` for each row ``hidden[i]`` (``[M, H]`` → ``[M]``), chunked.

    ``weight``/``bias`` are the LM head's (``[V, H]``, ``[V]``); a tied head passes the embedding
    matrix, whose gradient then accumulates from both uses as usual. Matmuls run in ``dtype``: pass
    the one the plain head would use (default: the autocast dtype when autocast is on here, else
    the weight's); the softmax and everything after it run in float32.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    _check_whole(weight)
    if dtype is None:
        dtype = compute_dtype(hidden.device.type, weight.dtype)
    # Only the hidden states need a gradient (a frozen head; never under no_grad, as in evaluation)
    h_only = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad and not (
        bias is not None and bias.requires_grad)
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, transform, chunk_size, dtype, h_only)


def compute_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a linear layer computes in right now: autocast's if it is on, else its weight's."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight_dtype


def _check_whole(weight: torch.Tensor) -> None:
    """A partitioned parameter (DeepSpeed ZeRO-3 outside its module's forward) has no data: say so."""
    if weight.numel() == 0:
        raise RuntimeError("the LM head's weight is empty here (a ZeRO-3 partitioned parameter, freed after the "
                           "head's forward): the chunked head cannot run; use train.logps: full")


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transform: LogitTransform) -> torch.Tensor:
    """One chunk's float32 logits from the head already cast to the compute dtype (the only
    ``[chunk, V]`` tensors live at a time are this and its grad)."""
    return transform.apply(torch.nn.functional.linear(h.to(w.dtype), w, b).float())


def _grad_logits(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor | float,
                 transform: LogitTransform) -> torch.Tensor:
    """``g · ∂ log P(y)/∂(hWᵀ+b)`` for one chunk, overwriting its logits ``z``.

    ∂/∂z of ``z_y − lse`` is ``onehot(y) − softmax(z)``; the softmax reuses the forward's ``lse``.
    """
    factor = transform.grad_factor(z)
    gcol = g[:, None] if isinstance(g, torch.Tensor) else torch.full_like(lse[:, None], g)
    dz = z.sub_(lse[:, None]).exp_().mul_(-gcol)
    dz.scatter_add_(1, targets[:, None], gcol)
    return dz.mul_(factor) if isinstance(factor, torch.Tensor) or factor != 1.0 else dz


class _ChunkedTokenLogps(torch.autograd.Function):
    """Forward: log-probs and each row's logsumexp. Backward: recompute each chunk's logits.

    When the head's weight and bias need no gradient (LoRA without ``modules_to_save``), the
    gradient of the hidden states is computed in the forward instead, while the chunk's logits
    are there (``∂ log P/∂h``, one ``[chunk, H]`` matmul), and the backward only scales it by
    the incoming gradient: 2 head matmuls, as many as the plain path, instead of 3.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_size, dtype, h_only):
        m = hidden.shape[0]
        logps = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
        dlogp_dh = torch.empty_like(hidden) if h_only else None
        # one cast of the head per forward (at 128k x 4096 in bf16 a 1 GiB copy), not one per chunk
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, m, chunk_size):
                rows = slice(s, s + chunk_size)
                z = _logits(hidden[rows], w, b, transform)
                torch.logsumexp(z, dim=-1, out=lse[rows])
                picked = z.gather(1, targets[rows, None]).squeeze(1)
                torch.sub(picked, lse[rows], out=logps[rows])
                if dlogp_dh is not None:
                    dlogp_dh[rows] = _grad_logits(z, lse[rows], targets[rows], 1.0, transform).to(dtype) @ w
                del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, dlogp_dh)
        ctx.transform, ctx.chunk_size, ctx.dtype = transform, chunk_size, dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse, dlogp_dh = ctx.saved_tensors
        _check_whole(weight)
        if dlogp_dh is not None:
            return (dlogp_dh * grad_logps[:, None].to(dlogp_dh.dtype), None, None, None, None, None, None, None)
        transform, chunk, dtype = ctx.transform, ctx.chunk_size, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Sum the weight's gradient over chunks in float32: a bf16 running sum would round at every chunk.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # one cast of the head per backward, as in the forward
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                rows = slice(s, s + chunk)
                h = hidden[rows].to(dtype)
                z = _logits(h, w, b, transform)
                dz = _grad_logits(z, lse[rows], targets[rows], grad_logps[rows].float(), transform).to(dtype)
                del z
                if grad_h is not None:
                    grad_h[rows] = dz @ w
                if grad_w is not None:
                    if dtype == torch.float32:
                        grad_w.addmm_(dz.t(), h)
                    else:
                        grad_w += dz.t() @ h
                if grad_b is not None:
                    grad_b += dz.sum(0, dtype=torch.float32)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)
