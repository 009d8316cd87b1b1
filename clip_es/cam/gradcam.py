"""Softmax-GradCAM over the last ViT block (SPEC section 2, steps 3-6).

Pure tensor functions: no files, no model loading.

The targets of one image share the forward of the last block. GradCAM needs of each
target's gradient only its mean over the patch tokens (the channel weights), and
``mode="analytic"`` (what ``auto`` picks for open_clip's ViT blocks with mean pooling)
computes exactly that in closed form, for every target at once, without autograd:

* the pooled embedding is a mean, so every patch token gets the same cotangent at
  ``ln_post``; its backward is ``rstd_t (r - beta_t xhat_t)`` and the MLP's second
  weight is applied to the tokens once (``xhat @ W2``), not once per target;
* of the attention's backward only the token sum is needed: the value path's sum is
  the cotangents weighted by the attention's row sums, the key path's sum needs one
  dot product per token, and the query path's one ``P^T [G | G.O]`` product per head
  for all targets together; the ``N x N`` softmax gradient is never formed.

On ViT-B/16 at VOC size this is 1.9x faster than the autograd backward with three
targets (``pipelines/bench/bench_cam.py``: maps within 7e-7 of autograd's), and its maps
equal autograd's to rounding (``tests/test_cam.py`` asserts 1e-5). ``mode="batched"`` is the autograd reference: ONE batched
backward (``torch.autograd.grad(..., is_grads_batched=True)``: a vmap over the per-target
cotangents), used for other blocks (LayerScale, CLS pooling, another MLP) and under a
reduced-precision last block; ``mode="loop"`` runs one backward per target (for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_es.model.dense import Pooling, attention, block_forward, explicit_attention, pool_tokens, split_heads

Mode = Literal["auto", "analytic", "batched", "loop"]
MODES: tuple[str, ...] = get_args(Mode)


@dataclass
class GradCamOutput:
    """Result for one image.

    Attributes:
        cam: ``(K, h, w)`` min-max normalised CAMs in [0, 1], one per target.
        attn_last: ``(N, N)`` head-averaged patch attention of the last block.
        logits: ``(M,)`` scaled cosine logits of the softmax set.
    """

    cam: torch.Tensor
    attn_last: torch.Tensor
    logits: torch.Tensor


def minmax(x: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Min-max normalise over ``dims`` to [0, 1]; a constant map becomes all zeros."""
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def softmax_gradcam(visual: nn.Module, penultimate: torch.Tensor, grid: tuple[int, int], text: torch.Tensor,
                    n_targets: int, logit_scale: float, pooling: Pooling = "mean", use_softmax: bool = True,
                    mode: Mode = "auto") -> GradCamOutput:
    """GradCAM of the image's own classes on the softmax over classes + background words.

    Args:
        visual: open_clip ``VisionTransformer`` (frozen).
        penultimate: ``(1, 1 + N, C)`` tokens entering the last block.
        grid: ``(h, w)`` with ``h * w = N``.
        text: ``(M, D)`` L2-normalised embeddings; rows ``0..n_targets-1`` are the image's
            classes (the targets), the rest are background words. The softmax runs over
            exactly these ``M`` rows.
        n_targets: ``K``.
        logit_scale: CLIP's ``logit_scale.exp()``.
        pooling: image embedding pooling (``mean`` of patch tokens, as CLIP-ES).
        use_softmax: ``False`` = plain GradCAM on the raw logit of each class (ablation).
            With ``M == 1`` (one target, no background words) the softmax is constant, so
            the raw logit is used whatever this says.
        mode: ``auto`` (``analytic`` where :func:`analytic_supported`, else ``batched``),
            ``analytic`` (closed-form token-summed gradients), ``batched`` (one autograd
            backward for all targets) or ``loop`` (one per target).

    Returns:
        :class:`GradCamOutput`; ``cam`` is ``(K, h, w)``.
    """
    g = softmax_gradcam_batch(visual, penultimate, grid, [text], [n_targets], logit_scale, pooling, use_softmax,
                              mode)
    return GradCamOutput(g.cam[0, :n_targets], g.attn_last[0], g.logits[0, :text.shape[0]])


def softmax_gradcam_batch(visual: nn.Module, penultimate: torch.Tensor, grid: tuple[int, int],
                          texts: list[torch.Tensor], n_targets: list[int], logit_scale: float,
                          pooling: Pooling = "mean", use_softmax: bool = True,
                          mode: Mode = "auto",
                          autocast_dtype: torch.dtype | None = None) -> GradCamOutput:
    """:func:`softmax_gradcam` for ``B`` images of one grid at once: one last-block forward, and
    the gradients of every target of every image at once (closed form or one backward).

    Image ``i`` has its own softmax set ``texts[i]`` ``(M_i, D)`` whose first ``n_targets[i]``
    rows are its targets. The sets are padded to ``M = max M_i`` (padded logits are ``-inf``
    before the softmax, so they take no probability and no gradient) and the targets to
    ``K = max K_i``; the ``K`` backward cotangents each pick target ``j`` of every image at
    once (images do not interact in the block, so image ``i``'s gradient is its own).

    Args:
        penultimate: ``(B, 1 + N, C)`` tokens entering the last block.
        texts, n_targets: per image, as ``text`` and ``n_targets`` of :func:`softmax_gradcam`.
        autocast_dtype: run the block's forward (and so its backward) under ``torch.autocast``
            with this dtype; ``None`` (the stage's choice) = fp32. The activations ``A``, their
            gradients and the CAMs stay fp32 either way.

    Returns:
        :class:`GradCamOutput` with a batch dim: ``cam`` ``(B, K, h, w)`` (rows
        ``n_targets[i]..K-1`` of image ``i`` all zero), ``attn_last`` ``(B, N, N)``,
        ``logits`` ``(B, M)`` (``-inf`` past ``M_i``). In fp32 each image's maps equal
        :func:`softmax_gradcam` on it alone to rounding (within 1e-6).
    """
    # The block's weights are fp32: tokens and text from a caller's autocast region (bf16/fp16)
    # are cast up, and that region is switched off here, so a reduced-precision activation never
    # meets an fp32 weight; only ``autocast_dtype`` turns autocast on again, for the block alone.
    x = penultimate.detach().float()
    texts = [t.float() for t in texts]
    with torch.autocast(x.device.type, enabled=False):
        return _gradcam_batch(visual, x, grid, texts, n_targets, logit_scale, pooling, use_softmax, mode,
                              autocast_dtype)


def _gradcam_batch(visual, x, grid, texts, n_targets, logit_scale, pooling, use_softmax, mode, autocast_dtype):
    """:func:`softmax_gradcam_batch` on fp32 ``x`` and ``texts``, outside any autocast region."""
    h, w = grid
    b = x.shape[0]
    k = max(n_targets, default=0)
    blk = visual.transformer.resblocks[-1]
    if k == 0:
        with torch.no_grad():
            _, _, attn = block_forward(blk, x, need_weights=True)
        return GradCamOutput(torch.zeros((b, 0, h, w), device=x.device), attn[:, 1:, 1:],
                             torch.zeros((b, 0), device=x.device))
    m = max(t.shape[0] for t in texts)
    onehot = np.zeros((k, b, m), np.float32)  # cotangent j picks target j of every image (built on the host)
    for i, ki in enumerate(n_targets):
        onehot[np.arange(ki), i, np.arange(ki)] = 1.0
    # A softmax over a single row is 1 whatever the image: its gradient is zero and every
    # CAM would be empty. With one target and no background words, use the logit.
    soft = [use_softmax and t.shape[0] > 1 for t in texts]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    closed_form = autocast_dtype is None and analytic_supported(visual, pooling)
    if mode == "auto":
        mode = "analytic" if closed_form else "batched"
    if mode == "analytic":
        if not closed_form:
            raise ValueError("mode='analytic' needs an open_clip ViT block (no LayerScale, c_fc/gelu/c_proj MLP), "
                             "mean pooling and an fp32 last block; use mode='batched'")
        a, weights, probs_attn, logits = _analytic_weights(visual, x, texts, soft, logit_scale, onehot)
    else:
        a, weights, probs_attn, logits = _autograd_weights(visual, x, texts, soft, logit_scale, onehot, pooling,
                                                           mode, autocast_dtype)
    acts = a[:, 1:]  # (B, N, C)
    cam = F.relu(weights @ acts.transpose(1, 2)).reshape(b, k, h, w)
    return GradCamOutput(minmax(cam), probs_attn[:, 1:, 1:], logits)


def _logits(visual: nn.Module, out: torch.Tensor, texts: list[torch.Tensor], logit_scale: float,
            pooling: Pooling) -> torch.Tensor:
    """``(B, M)`` scaled cosine logits of each image against its own set, ``-inf`` past ``M_i``.

    The pooled projection and the logits are one-row products per image: a B-row GEMM takes
    another kernel (and rounding) than a one-row one, so this keeps every image's maps what it
    gets alone; the other ops are row-wise or batched matmuls."""
    m = max(t.shape[0] for t in texts)
    return torch.cat([_image_logits(pool_tokens(visual, out[i:i + 1], pooling), t, logit_scale, m)[1]
                      for i, t in enumerate(texts)])


def _image_logits(pooled: torch.Tensor, text: torch.Tensor, logit_scale: float, m: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's normalised embedding ``(1, D)`` and its ``(1, m)`` logits against ``text``
    ``(M_i, D)``, padded with ``-inf`` to ``m``."""
    f = F.normalize(pooled, dim=-1)
    return f, F.pad(logit_scale * f @ text.t(), (0, m - text.shape[0]), value=float("-inf"))


def _autograd_weights(visual, x, texts, soft, logit_scale, onehot, pooling, mode, autocast_dtype):
    """GradCAM channel weights ``(B, K, C)`` by autograd (``batched``: one vmapped backward;
    ``loop``: one per target). Returns ``(A, weights, head-averaged attention, logits)``."""
    blk = visual.transformer.resblocks[-1]
    k = onehot.shape[0]
    with torch.enable_grad():
        a = blk.ln_1(x).detach().requires_grad_(True)  # the activations A (B, 1+N, C)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            y, probs_attn = attention(blk.attn, a, need_weights=True)  # explicit softmax: vmappable
            out = x + blk.ls_1(y)
            out = out + blk.ls_2(blk.mlp(blk.ln_2(out)))
        out = out.float()
        logits = _logits(visual, out, texts, logit_scale, pooling)  # (B, M)
        if all(soft) or not any(soft):
            scores = logits.softmax(-1) if soft[0] else logits
        else:
            scores = torch.where(torch.tensor(soft, device=x.device)[:, None], logits.softmax(-1), logits)
        eye = torch.from_numpy(onehot).to(scores.device, scores.dtype)  # (K, B, M)
        if mode == "batched":
            (grads,) = torch.autograd.grad(scores, a, grad_outputs=eye, is_grads_batched=True)  # (K, B, 1+N, C)
        else:
            grads = torch.stack([torch.autograd.grad(scores, a, grad_outputs=eye[j], retain_graph=True)[0]
                                 for j in range(k)])
    weights = grads[:, :, 1:].mean(2).transpose(0, 1)  # (B, K, C): spatial mean of the gradient
    return a.detach(), weights, probs_attn.detach(), logits.detach()


#: activations of the MLP that act element by element (their derivative is a vector)
_ELEMENTWISE = ("QuickGELU", "GELU", "ReLU", "SiLU", "Tanh", "Sigmoid")


def analytic_supported(visual: nn.Module, pooling: Pooling = "mean") -> bool:
    """True when :func:`softmax_gradcam_batch` can use ``mode="analytic"`` for this ViT: mean
    pooling and an open_clip last block (``nn.MultiheadAttention``, LayerNorms, no
    LayerScale, a ``c_fc`` / element-wise activation / ``c_proj`` MLP)."""
    blk = visual.transformer.resblocks[-1]
    mlp = getattr(blk, "mlp", None)
    return (pooling == "mean" and getattr(visual, "proj", None) is not None
            and isinstance(getattr(blk, "ls_1", None), nn.Identity) and isinstance(getattr(blk, "ls_2", None), nn.Identity)
            and isinstance(mlp, nn.Sequential) and [n for n, _ in mlp.named_children()] == ["c_fc", "gelu", "c_proj"]
            and type(mlp.gelu).__name__ in _ELEMENTWISE
            and isinstance(blk.ln_1, nn.LayerNorm) and isinstance(blk.ln_2, nn.LayerNorm)
            and isinstance(visual.ln_post, nn.LayerNorm)
            and isinstance(blk.attn, nn.MultiheadAttention) and blk.attn.in_proj_weight is not None)


def _ln_stats(ln: nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xhat, rstd)`` of LayerNorm ``ln`` on ``x`` (over the last dim)."""
    mu = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + ln.eps)
    return (x - mu) * rstd, rstd


def _ln_backward(ln: nn.LayerNorm, xhat: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Input cotangent of LayerNorm ``ln`` for output cotangent ``g`` (broadcasting leading dims)."""
    gh = g * ln.weight if ln.weight is not None else g
    return rstd * (gh - gh.mean(-1, keepdim=True) - xhat * (gh * xhat).mean(-1, keepdim=True))


@torch.no_grad()
def _analytic_weights(visual, x, texts, soft, logit_scale, onehot):
    """GradCAM channel weights ``(B, K, C)`` in closed form (module doc): the last block's
    forward, then for every target the patch-token mean of ``d score / d A`` without autograd.

    Notation: ``L = 1 + N`` tokens (CLS first), ``H`` heads of width ``d``, ``P`` ``(B, H, L, L)``
    the attention, ``O = P V`` the heads' outputs, ``G`` the cotangent at ``O`` (zero on the CLS
    row: mean pooling reads only patch tokens and the MLP is token-wise).
    Returns ``(A, weights, head-averaged attention, logits)``."""
    blk = visual.transformer.resblocks[-1]
    at, mlp = blk.attn, blk.mlp
    b, L, c = x.shape
    heads = at.num_heads
    d, n, kk = c // heads, L - 1, onehot.shape[0]
    scale = d ** -0.5
    # forward (fp32), keeping what the backward reads
    a = blk.ln_1(x)
    q, k, v = split_heads(at, a)  # (B, H, L, d)
    p, o = explicit_attention(q, k, v)  # (B, H, L, L), (B, H, L, d)
    out = x[:, 1:] + at.out_proj(o.transpose(1, 2).reshape(b, L, c))[:, 1:]  # patch tokens only from here
    xhat2, rstd2 = _ln_stats(blk.ln_2, out)
    hdn = mlp.c_fc(blk.ln_2(out)).requires_grad_(True)
    with torch.enable_grad():  # the activation's derivative (element-wise, so one backward of ones)
        act = mlp.gelu(hdn)
        (dact,) = torch.autograd.grad(act, hdn, torch.ones_like(act))
    z = out + mlp.c_proj(act.detach())
    xhatp, rstdp = _ln_stats(visual.ln_post, z)
    zn = visual.ln_post(z)
    m = max(t.shape[0] for t in texts)
    eye = torch.from_numpy(onehot).to(x.device)  # (K, B, M)
    logits, g_pooled = [], []
    for i, t in enumerate(texts):  # one-row products per image, as _logits
        mi = t.shape[0]
        pooled = zn[i:i + 1].mean(1) @ visual.proj  # (1, D)
        f, li = _image_logits(pooled, t, logit_scale, m)  # (1, D), (1, M)
        logits.append(li)
        e = eye[:, i, :mi]  # (K, M_i): target j's one-hot
        if soft[i]:
            pr = li[:, :mi].softmax(-1)
            gl = (e * pr).sum(-1, keepdim=True) * (e - pr)  # d p_j / d logits = p_j (e_j - p)
        else:
            gl = e
        gf = logit_scale * gl @ t  # (K, D) at the normalised embedding
        g_pooled.append((gf - (gf * f).sum(-1, keepdim=True) * f) / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12))
    gmean = torch.stack(g_pooled, 1) @ visual.proj.t() / n  # (K, B, C): the cotangent of every patch token
    # ln_post backward with one cotangent for all tokens: rstd_t (r - beta_t xhat_t)
    gam = gmean * visual.ln_post.weight if visual.ln_post.weight is not None else gmean
    r = gam - gam.mean(-1, keepdim=True)
    beta = (xhatp[None] @ gam[..., None])[..., 0] / c  # (K, B, N)
    g_z = rstdp * (r[:, :, None] - beta[..., None] * xhatp)  # (K, B, N, C)
    w2 = mlp.c_proj.weight
    g_hdn = rstdp * ((r @ w2)[:, :, None] - beta[..., None] * (xhatp @ w2)) * dact  # = (g_z @ W2) * act'
    g_out = g_z + _ln_backward(blk.ln_2, xhat2, rstd2, g_hdn @ mlp.c_fc.weight)  # (K, B, N, C)
    g = (g_out @ at.out_proj.weight).view(kk, b, n, heads, d).transpose(2, 3)  # G (K, B, H, N, d)
    pp, op = p[:, :, 1:], o[:, :, 1:]  # patch rows (B, H, N, L), (B, H, N, d)
    gdo = (g * op).sum(-1)  # G_t . O_t (K, B, H, N)
    # value path: sum_{s patch} dV_s = sum_t G_t rho_t, rho_t = sum_{s patch} P_ts
    rho = pp[..., 1:].sum(-1)
    sum_v = (g * rho[..., None]).sum(-2)  # (K, B, H, d)
    # key path: sum_{s patch} dK_s = scale sum_t (G_t . Ohat_t - rho_t G_t . O_t) q_t, Ohat_t = sum_{s patch} P_ts v_s
    ohat = pp[..., 1:] @ v[:, :, 1:]
    sum_k = scale * (((g * ohat).sum(-1) - gdo * rho)[..., None] * q[:, :, 1:]).sum(-2)
    # query path: sum_t dQ_t = scale sum_s (col_s of dS) k_s, col_s = (P^T G)_s . v_s - (P^T (G.O))_s;
    # one (L x N) @ (N x K(d+1)) product per head carries every target
    gc = torch.cat([g, gdo[..., None]], -1).permute(1, 2, 3, 0, 4).reshape(b, heads, n, kk * (d + 1))
    rt = (pp.transpose(-1, -2) @ gc).view(b, heads, L, kk, d + 1).permute(3, 0, 1, 2, 4)  # (K, B, H, L, d+1)
    sum_q = scale * ((((rt[..., :d] * v).sum(-1) - rt[..., d]))[..., None] * k).sum(-2)
    wq, wk, wv = at.in_proj_weight.chunk(3)
    flat = [s.reshape(kk, b, c) for s in (sum_q, sum_k, sum_v)]
    weights = (flat[0] @ wq + flat[1] @ wk + flat[2] @ wv) / n  # (K, B, C)
    return a, weights.transpose(0, 1), p.mean(1), torch.cat(logits)
