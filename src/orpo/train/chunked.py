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
                        chunk_size: int = 1024) -> torch.Tensor:
    """float32 ``log P(targets[i])`` for each row ``hidden[i]`` (``[M, H]`` → ``[M]``), chunked.

    ``weight``/``bias`` are the LM head's (``[V, H]``, ``[V]``); a tied head passes the embedding
    matrix, whose gradient then accumulates from both uses as usual. Matmuls run in the dtype the
    plain head would use (the autocast dtype when autocast is on, else the weight's); the softmax
    and everything after it in float32.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, transform, chunk_size, dtype)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform,
            dtype: torch.dtype) -> torch.Tensor:
    """One chunk's float32 logits (the only ``[chunk, V]`` tensors live at a time are this and its grad)."""
    z = torch.nn.functional.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return transform.apply(z.float())


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_size, dtype):
        m = hidden.shape[0]
        logps = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, m, chunk_size):
                z = _logits(hidden[s : s + chunk_size], weight, bias, transform, dtype)
                torch.logsumexp(z, dim=-1, out=lse[s : s + chunk_size])
                picked = z.gather(1, targets[s : s + chunk_size, None]).squeeze(1)
                torch.sub(picked, lse[s : s + chunk_size], out=logps[s : s + chunk_size])
                del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.transform, ctx.chunk_size, ctx.dtype = transform, chunk_size, dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        transform, chunk, dtype = ctx.transform, ctx.chunk_size, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Sum the weight's gradient over chunks in float32: a bf16 running sum would round at every chunk.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)
                g = grad_logps[s : s + chunk].float()
                z = _logits(h, weight, bias, transform, dtype)
                factor = transform.grad_factor(z)
                # ∂/∂z of g·(z_y − lse) = g·(onehot(y) − softmax(z)), in place in z (the forward's lse)
                dz = z.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])
                dz.scatter_add_(1, targets[s : s + chunk, None], g[:, None])
                if isinstance(factor, torch.Tensor) or factor != 1.0:
                    dz.mul_(factor)
                dz = dz.to(dtype)
                del z, factor
                if grad_h is not None:
                    grad_h[s : s + chunk] = dz @ w
                if grad_w is not None:
                    if dtype == torch.float32:
                        grad_w.addmm_(dz.t(), h)
                    else:
                        grad_w += dz.t() @ h
                if grad_b is not None:
                    grad_b += dz.sum(0, dtype=torch.float32)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)
