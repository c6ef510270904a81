"""Reference top-k softmax aggregation: global top-k, aggregation, merging and multi-head top-k attention.

Conventions shared by every backend (the tests hold each backend to these):
  * Ordering: candidates are ranked by logit, descending; equal logits go to the lower key index. A stable
    descending sort over keys in index order is the definition. Scores q·k are formed and ranked in the
    accumulation dtype (float32 for float16/bfloat16 inputs, else the input's), as the kernels do; fp16/bf16
    logits are rounded only on output, so two returned logits may be equal with the higher index first.
  * Invalid keys: a key excluded by `key_mask` (False), or whose logit is -inf or NaN, is never selected. When a
    row has fewer valid keys than k, the missing slots are padded with index -1 and logit -inf.
  * Aggregation ignores every candidate with index -1 or logit -inf (weight 0). A row without any valid candidate
    outputs 0 and passes zero gradient (never NaN).
  * Softmax is always computed max-subtracted (XMem's exp-normalisation, stable in fp16), in the accumulation
    dtype.
  * topk_attention: dense keys are always kept (a NaN logit there gives a NaN row, as in SDPA); among the other
    keys a NaN or -inf logit is never selected. With topk >= L - dense_keys nothing is selected: every key is
    kept, and the result is SDPA's, NaN included.
"""

from __future__ import annotations

import torch

from ._dtypes import compute_dtype

NORMALIZE = ("softmax", "threshold")


def _rank(logits: torch.Tensor, index: torch.Tensor):
    """Sort candidates (..., K) by (logit desc, index asc); invalid ones (index -1, logit -inf/NaN) go last."""
    valid = (index >= 0) & (logits > float("-inf"))  # NaN compares False: invalid
    key = torch.where(valid, logits, torch.full_like(logits, float("-inf")))
    # Two stable sorts: first by index ascending, then by logit descending, so ties keep the lower index first.
    order = torch.sort(torch.where(valid, index, torch.full_like(index, torch.iinfo(torch.int64).max)),
                       dim=-1, stable=True).indices
    key_o = torch.gather(key.detach(), -1, order)
    order = torch.gather(order, -1, torch.sort(key_o, dim=-1, descending=True, stable=True).indices)
    return order, torch.gather(valid, -1, order)


def global_topk(q: torch.Tensor, k: torch.Tensor, *, topk: int, scale: float = 1.0,
                key_mask: torch.Tensor | None = None, key_tile: int = 4096):
    """(logits (B, M, topk), index (B, M, topk) int64) of the `topk` largest scale * q·k per query.

    q (B, M, C), k (B, L, C), key_mask (B, L) bool, True = the key takes part. Streams over key tiles of
    `key_tile` keys, keeping a running top-k, so memory is O(B·M·(topk + key_tile)); the result is exactly the
    dense definition (stable descending sort of all L logits). Differentiable w.r.t. q and k through the logits.
    """
    B, M, _ = q.shape
    L = k.shape[1]
    acc = compute_dtype(q.dtype)
    best_l = q.new_full((B, M, 0), float("-inf"), dtype=acc)
    best_i = torch.zeros(B, M, 0, dtype=torch.int64, device=q.device)
    for start in range(0, L, key_tile):
        stop = min(L, start + key_tile)
        s = scale * torch.matmul(q.to(acc), k[:, start:stop].to(acc).transpose(1, 2))
        idx = torch.arange(start, stop, device=q.device).expand(B, M, stop - start)
        if key_mask is not None:
            idx = torch.where(key_mask[:, None, start:stop], idx, torch.full_like(idx, -1))
        # Running list first: its indices are lower than the tile's, so the stable rank keeps them on ties.
        cand_l = torch.cat([best_l, s], dim=-1)
        cand_i = torch.cat([best_i, idx], dim=-1)
        order, valid = _rank(cand_l, cand_i)
        order, valid = order[..., :topk], valid[..., :topk]
        best_l = torch.where(valid, torch.gather(cand_l, -1, order), torch.full_like(s[..., :1], float("-inf")))
        best_i = torch.where(valid, torch.gather(cand_i, -1, order), torch.full_like(idx[..., :1], -1))
    return best_l.to(q.dtype), best_i


def merge_topk(candidates, topk: int):
    """Top-`topk` of the union of (logits, index) pairs (B, M, K_i) whose indices share one key space.

    Same ordering and padding rules as global_topk (ties to the lower index; index -1 / logit -inf entries are
    invalid and padded at the end). Duplicate indices are not removed: the caller keeps the index spaces disjoint.
    """
    logits = torch.cat([c[0] for c in candidates], dim=-1)
    index = torch.cat([c[1] for c in candidates], dim=-1)
    order, valid = _rank(logits, index)
    order, valid = order[..., :topk], valid[..., :topk]
    out_l = torch.where(valid, torch.gather(logits, -1, order), torch.full_like(logits[..., :1], float("-inf")))
    out_i = torch.where(valid, torch.gather(index, -1, order), torch.full_like(index[..., :1], -1))
    return out_l, out_i


def _kept(logits: torch.Tensor, index: torch.Tensor, normalize: str, k: int | None,
          in_range: torch.Tensor | bool = True) -> torch.Tensor:
    """Bool (B, M, K): the candidates that take part in the softmax."""
    valid = (index >= 0) & (logits > float("-inf")) & in_range
    if normalize == "threshold":
        # Keep every valid logit >= the k-th largest valid one (ties kept); fewer than k valid keeps them all.
        masked = torch.where(valid, logits.detach(), torch.full_like(logits, float("-inf")))
        kk = min(k, logits.shape[-1])
        kth = torch.topk(masked, kk, dim=-1).values[..., -1:]
        valid = valid & ((masked >= kth) | (kth == float("-inf")))
    return valid


def softmax_weights(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Max-subtracted softmax over the kept entries of the last dim; rows with nothing kept give all-zero weights."""
    if logits.shape[-1] == 0:  # no candidate at all
        return logits * 0
    masked = torch.where(kept, logits, torch.full_like(logits, float("-inf")))
    m = masked.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(kept, torch.exp(masked - m), torch.zeros_like(logits))
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def topk_aggregate(logits: torch.Tensor, index: torch.Tensor, values: torch.Tensor, *, normalize: str = "softmax",
                   k: int | None = None) -> torch.Tensor:
    """out[b, m] = sum_j w[b, m, j] * values[b, index[b, m, j]]  (B, M, Cv), w the softmax over kept candidates.

    logits, index (B, M, K); values (B, L, Cv). "softmax" keeps every valid candidate, "threshold" keeps the
    valid ones >= the k-th largest valid logit (DINO/INO label propagation: ties kept, so more than k may
    survive). Differentiable w.r.t. logits and values.
    """
    B, M, K = logits.shape
    L, Cv = values.shape[1], values.shape[2]
    acc = compute_dtype(values.dtype)
    in_range = index < L  # an unchecked out-of-range index is dropped like an empty slot (-1), never read
    w = softmax_weights(logits.to(acc), _kept(logits, index, normalize, k, in_range))
    safe = index.clamp(0, max(L - 1, 0))
    gathered = torch.gather(values.to(acc), 1, safe.reshape(B, M * K, 1).expand(B, M * K, Cv))
    return (w.reshape(B, M * K, 1) * gathered).reshape(B, M, K, Cv).sum(dim=2).to(values.dtype)


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int, scale: float | None = None,
                   dense_keys: int = 0) -> torch.Tensor:
    """Top-k attention in the SDPA layout: q (B, H, M, D), k (B, H, L, D), v (B, H, L, Dv) -> (B, H, M, Dv).

    Keys [0, dense_keys) are always kept; among keys [dense_keys, L) only the `topk` largest logits
    scale * q·k (ties to the lower index) are kept; one softmax over the kept set. scale defaults to 1/sqrt(D).
    With topk >= L - dense_keys every key is kept and this is F.scaled_dot_product_attention.
    """
    D, L = q.shape[-1], k.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    acc = compute_dtype(q.dtype)
    # (B, H, M, L): the reference may materialise it
    s = scale * torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))
    kept = torch.zeros_like(s, dtype=torch.bool)
    n_sparse = L - dense_keys
    if topk >= n_sparse:  # no selection: SDPA
        kept[:] = True
    else:
        kept[..., :dense_keys] = True
        sparse = s[..., dense_keys:].detach()
        valid = sparse > float("-inf")  # NaN compares False: never selected
        order = torch.sort(torch.where(valid, sparse, float("-inf")), dim=-1, descending=True,
                           stable=True).indices[..., :topk]
        chosen = torch.zeros_like(valid).scatter_(-1, order, True)
        kept[..., dense_keys:] = chosen & valid
    w = softmax_weights(s, kept)
    return torch.matmul(w, v.to(acc)).to(v.dtype)
