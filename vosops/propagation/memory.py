"""Memory policies: which earlier frames a query frame t reads from.

Every policy answers `indices(t)` (sorted frame indices < t, for t >= 1) and `retain(t)` (frames that any later
query t' > t may still read, so the engine can drop cached features and labels of the others). Frames that carry
a given mask (the first frame, late-appearing objects) are added by the engine as `anchors`.
"""

from __future__ import annotations


def _check_t(t) -> int:
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t must be an int >= 1 (the query frame; frame 0 carries the given mask), got {t!r}")
    return t


def _check_pos(name, v, low=1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return v


class MemoryPolicy:
    anchors: tuple[int, ...] = ()

    def with_anchors(self, anchors) -> "MemoryPolicy":
        """Frames with a given mask are kept for good (the first frame always is)."""
        self.anchors = tuple(sorted(set(int(a) for a in anchors)))
        return self

    def _schedule(self, t: int) -> set[int]:
        raise NotImplementedError

    def indices(self, t: int) -> list[int]:
        t = _check_t(t)
        frames = self._schedule(t) | {a for a in self.anchors if a < t} | {0}
        return sorted(f for f in frames if 0 <= f < t)

    def retain(self, t: int) -> set[int]:
        """Frames <= t that a later query may read: the anchors plus what the schedule reaches back to."""
        keep = {a for a in self.anchors if a <= t} | {0}
        keep |= {f for f in range(max(0, t - self.horizon), t + 1)}
        keep |= self._long_term(t)
        return keep

    horizon = 1

    def _long_term(self, t: int) -> set[int]:
        return set()


class FirstAndRecent(MemoryPolicy):
    """The first frame plus the n most recent frames (never frame 0 twice).

    DINO / INO ("first + last n"): DINO's queue of n_last_frames=7 holds previous frames, frame 0 is always added;
    at t = 1 only frame 0 is read. INO: N_c = 10 on DAVIS (20 on YouTube-VOS).
    Mask-VOS ("first + FIFO of n", n = 20 in its paper's testing protocol and released config): a
    first-in-first-out queue of the previous frames, frame 0 kept: the same index sets.
    """

    def __init__(self, n: int):
        self.n = _check_pos("n", n)
        self.horizon = self.n

    def _schedule(self, t):
        return set(range(max(1, t - self.n), t))

    def __repr__(self):
        return f"FirstAndRecent(n={self.n})"


def first_last(n: int) -> FirstAndRecent:
    return FirstAndRecent(n)


def first_fifo(n: int) -> FirstAndRecent:
    return FirstAndRecent(n)


class MampMemory(MemoryPolicy):
    """MAMP's long-/short-term memory (released code, `get_davis_ref_index(i, mem_gap=2, ref=5)`, query t = i + 1):
    long-term frames 0 and 5 once they are in the past, short-term t-1, t-3, t-5 (those > 0)."""

    def __init__(self, long_term=(0, 5), short_term=(1, 3, 5)):
        self.long_term = tuple(sorted(_check_pos("long_term frame", int(f), 0) for f in long_term))
        self.short_term = tuple(sorted(_check_pos("short_term offset", int(s)) for s in short_term))
        self.horizon = max(self.short_term)

    def _schedule(self, t):
        return {f for f in self.long_term if f <= t - 1} | {t - s for s in self.short_term if t - s > 0}

    def _long_term(self, t):
        return {f for f in self.long_term if f <= t}

    def __repr__(self):
        return f"MampMemory(long_term={self.long_term}, short_term={self.short_term})"


class EveryS(MemoryPolicy):
    """XMem / JointFormer: the first frame, every S-th frame kept in a FIFO of at most M, and (optionally) the
    previous frame. JointFormer on YouTube-VOS: every S-th frame, at most 3 besides the previous frame (S = 5 as
    in XMem/STCN, the work it follows); on DAVIS it keeps only the first and the previous frame (M = 0)."""

    def __init__(self, every: int = 5, max_frames: int = 3, previous: bool = True):
        self.every = _check_pos("every", every)
        self.max_frames = _check_pos("max_frames", max_frames, 0)
        self.previous = bool(previous)
        self.horizon = 1 + self.every * self.max_frames

    def _sampled(self, t):
        picks = [f for f in range(self.every, t, self.every)]  # frames f < t with f % S == 0, f > 0
        return set(picks[-self.max_frames:]) if self.max_frames else set()

    def _schedule(self, t):
        out = self._sampled(t)
        if self.previous:
            out.add(t - 1)
        return out

    def __repr__(self):
        return f"EveryS(every={self.every}, max_frames={self.max_frames}, previous={self.previous})"
