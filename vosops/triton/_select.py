"""Running top-k lists of packed int64 keys, shared by the Triton kernels (global_topk, topk_attention,
local_attention). A key orders candidates by score, then by index (larger key = better); a row's list is KPAD wide
but keeps KK entries: slots past KK hold MAXKEY (never evicted), empty slots the kernel's EMPTY key (below every
real key). The list is kept unsorted; the kernel sorts it once at the end."""

from __future__ import annotations

import triton
import triton.language as tl

MAXKEY = tl.constexpr(2**63 - 1)


@triton.jit
def insert_entrants(best, keys, col, EMPTY: tl.constexpr):
    """Merge a tile's keys (BLOCK_M, BLOCK_N) into each row's list `best` (BLOCK_M, KPAD); col = arange(KPAD).
    The list's minimum is the row's KK-th best. Each round moves every row's largest entrant into its list's
    minimum slot; a tile needs as many rounds as the most keys any row admits (at most KK, and few once the lists
    fill), far cheaper than sorting the tile."""
    kth = tl.min(best, axis=1)
    cand = tl.where(keys > kth[:, None], keys, EMPTY)
    top = tl.max(cand, axis=1)
    while tl.max((top > kth).to(tl.int32)) > 0:
        enter = top > kth
        slot = tl.argmin(best, axis=1)
        best = tl.where(enter[:, None] & (col[None, :] == slot[:, None]), top[:, None], best)
        kth = tl.min(best, axis=1)
        # keys are unique per candidate index, so `!= top` removes exactly the key just placed (or refused)
        cand = tl.where((cand != top[:, None]) & (cand > kth[:, None]), cand, EMPTY)
        top = tl.max(cand, axis=1)
    return best


@triton.jit
def merge_tile(best, keys, col, KK, EMPTY: tl.constexpr, SORT_MIN: tl.constexpr):
    """insert_entrants for a tile as wide as the list, choosing per tile: when some row admits SORT_MIN keys or
    more, one sort of (list + tile) per row replaces that many insertion rounds (an empty list's first tile,
    say); otherwise the rounds. SORT_MIN is a launch parameter, tuned per GPU (0: sort whenever a key enters)."""
    BM: tl.constexpr = best.shape[0]
    BN: tl.constexpr = best.shape[1]
    kth = tl.min(best, axis=1)
    entrants = tl.max(tl.sum((keys > kth[:, None]).to(tl.int32), axis=1))
    if entrants >= tl.maximum(SORT_MIN, 1):
        both = tl.reshape(tl.join(tl.where(col[None, :] < KK, best, EMPTY), keys), (BM, 2 * BN))
        both = tl.sort(both, dim=1, descending=True)
        top, _ = tl.split(tl.permute(tl.reshape(both, (BM, 2, BN)), (0, 2, 1)))  # the first BN of each row
        best = tl.where(col[None, :] < KK, top, MAXKEY)
    elif entrants > 0:
        best = insert_entrants(best, keys, col, EMPTY)
    return best
