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
