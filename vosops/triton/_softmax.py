"""The online-softmax step the streaming Triton kernels share (global top-k's dense prefix, both local-attention
forwards)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(m, l, s):
    """One block of scores s (rows, cols) into a running row maximum m and sum l (rows,): the new maximum and sum,
    the factor alpha = exp(m - m_new) the caller rescales its accumulator by, and p = exp(s - m_new) it adds in.
    A row with nothing kept yet (m_new = -inf) is shifted by 0 instead, so -inf - -inf never makes a NaN: alpha
    and p are 0 there."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l * alpha + tl.sum(p, axis=1), alpha, p
