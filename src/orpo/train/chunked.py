"""The LM head a chunk of rows at a time, from final hidden states and the output weights.

    z = s · (h Wᵀ + b)              the logits of one row (s: the model's logit scale, 1 for most)
    z ← c · tanh(z / c)             only for models with a final logit soft-cap c (Gemma-2)
    log P(y) = z_y − logsumexp(z)
    ∂ log P(y) / ∂z = onehot(y) − softmax(z)

The plain path materializes ``z`` for every target row, ``[rows, vocab]`` (2.1 GB in float32 for
4,096 targets of a 128k vocabulary), then its log-softmax and their gradients. Here no tensor
larger than ``[chunk, vocab]`` ever exists. Two functions:

- ``chunked_loss`` (training): the caller supplies the loss of each chunk as a function of the
  chunk's token log-probs (the objective's per-pair math; a chunk holds whole pairs, so the loss
  is a sum over chunks). Each chunk's gradient with respect to the hidden states, the weight and
  the bias is computed in the forward, while its logits exist; the backward only scales the stored
  gradients by the incoming scalar. 3 head matmuls per chunk (2 with a frozen head), as many as
  the plain path: none is recomputed. The scheme of Liger-Kernel's fused linear losses. A pair
  longer than the chunk size runs in two passes of chunk-size slices (its logits recomputed), so
  memory stays bounded by the chunk size whatever the response length.
- ``chunked_token_logps`` (evaluation, reference log-probs, any other caller): plain per-token
  log-probs; its backward recomputes each chunk's logits (4 head matmuls), since the loss is not
  known in its forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


LSE_ROWS = 64


def _logsumexp(z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.logsumexp(z, -1)``, ``LSE_ROWS`` rows at a time: its internal ``z − max`` copy is then
    ``[64, V]``, not a second ``[chunk, V]`` beside the logits (64 MiB at 256 rows of a 65k vocabulary)."""
    out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device) if out is None else out
    for r in range(0, z.shape[0], LSE_ROWS):
        torch.logsumexp(z[r:r + LSE_ROWS], dim=-1, out=out[r:r + LSE_ROWS])
    return out


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
                _logsumexp(z, out=lse[rows])
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


# The loss of chunk ``k`` (an index into the row bounds) from its rows' float32 token log-probs.
ChunkLoss = Callable[[int, torch.Tensor], torch.Tensor]


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 bounds: Sequence[int], chunk_loss: ChunkLoss, transform: LogitTransform = LogitTransform(),
                 dtype: torch.dtype | None = None, max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_k chunk_loss(k, log P of rows bounds[k]:bounds[k+1]), log P of every row)``; gradients in the forward.

    ``bounds``: the row boundaries of the chunks, Python ints (0 first, ``len(hidden)`` last), so
    the loop asks the device nothing. ``chunk_loss`` must be a function of its own rows' log-probs
    only (whole pairs per chunk); it runs with autograd on, in float32, outside autocast. The
    returned log-probs are detached (for the metrics). ``weight``/``bias``/``dtype``: as in
    ``chunked_token_logps``. Call it only where a gradient is wanted: it computes one.

    ``max_rows``: the most rows whose logits may exist at once. A chunk of more rows (one pair
    longer than the chunk size: a long response at a large vocabulary) is run in two passes of
    ``max_rows`` slices, log-probs first, then the gradients with its logits recomputed: 4 head
    matmuls for that pair instead of 3, but memory stays bounded by ``max_rows`` whatever its length.
    """
    _check_whole(weight)
    if dtype is None:
        dtype = compute_dtype(hidden.device.type, weight.dtype)
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return _ChunkedLoss.apply(hidden, weight, bias, targets, tuple(bounds), chunk_loss, transform, dtype, need,
                              max_rows or hidden.shape[0] or 1)


class _Grads:
    """The head's gradients, summed slice by slice (the weight's in float32: a bf16 sum would round at each)."""

    def __init__(self, hidden, weight, bias, need):
        need_h, need_w, need_b = need
        self.h = torch.empty_like(hidden) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None

    def add(self, rows: slice, dz: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        if self.h is not None:
            self.h[rows] = dz @ w
        if self.w is not None:
            if dz.dtype == torch.float32:
                self.w.addmm_(dz.t(), h)
            else:
                self.w += dz.t() @ h
        if self.b is not None:
            self.b += dz.sum(0, dtype=torch.float32)


class _ChunkedLoss(torch.autograd.Function):
    """Forward: per chunk, logits → log-probs → the chunk's loss → its gradients. Backward: scale them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, bounds, chunk_loss, transform, dtype, need, max_rows):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = _Grads(hidden, weight, bias, need)
        # one cast of the head per forward (at 128k x 4096 in bf16 a 1 GiB copy), not one per chunk
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                if e - s <= max_rows:
                    h, y = hidden[s:e].to(dtype), targets[s:e]
                    z = _logits(h, w, b, transform)
                    lse = _logsumexp(z)
                    torch.sub(z.gather(1, y[:, None]).squeeze(1), lse, out=logps[s:e])
                    loss, g = _loss_and_grad(chunk_loss, k, logps[s:e])
                    grads.add(slice(s, e), _grad_logits(z, lse, y, g, transform).to(dtype), h, w)
                    del z
                else:
                    loss = _two_passes(hidden, w, b, targets, s, e, k, chunk_loss, transform, dtype, max_rows,
                                       logps, grads)
                total += loss
        # stored in the parameters' dtypes: the float32 sum was only needed while adding chunks
        ctx.save_for_backward(grads.h, None if grads.w is None else grads.w.to(weight.dtype),
                              None if grads.b is None else grads.b.to(bias.dtype))
        ctx.mark_non_differentiable(logps)
        return total, logps

    @staticmethod
    def backward(ctx, grad_total, _grad_logps):
        grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None)


def _two_passes(hidden, w, b, targets, s, e, k, chunk_loss, transform, dtype, max_rows, logps, grads) -> torch.Tensor:
    """A chunk longer than ``max_rows``: its log-probs slice by slice, its loss, then the gradients (logits again)."""
    lse = torch.empty(e - s, dtype=torch.float32, device=hidden.device)
    slices = [(a, min(a + max_rows, e)) for a in range(s, e, max_rows)]
    for a, z_end in slices:
        z = _logits(hidden[a:z_end].to(dtype), w, b, transform)
        _logsumexp(z, out=lse[a - s:z_end - s])
        torch.sub(z.gather(1, targets[a:z_end, None]).squeeze(1), lse[a - s:z_end - s], out=logps[a:z_end])
        del z
    loss, g = _loss_and_grad(chunk_loss, k, logps[s:e])
    for a, z_end in slices:
        h, part = hidden[a:z_end].to(dtype), slice(a - s, z_end - s)
        z = _logits(h, w, b, transform)
        grads.add(slice(a, z_end), _grad_logits(z, lse[part], targets[a:z_end], g[part], transform).to(dtype), h, w)
        del z
    return loss


def _loss_and_grad(chunk_loss: ChunkLoss, k: int, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's loss (detached) and its gradient with respect to the chunk's log-probs (tiny: one per row)."""
    with torch.enable_grad():
        x = logps.detach().requires_grad_()
        loss = chunk_loss(k, x)
        if not loss.requires_grad:  # every term of weight 0 (a loss that is only reported)
            return loss.detach().float(), torch.zeros_like(x)
        (g,) = torch.autograd.grad(loss, x, allow_unused=True, materialize_grads=True)
    return loss.detach().float(), g
