"""J and F as the official DAVIS evaluation (davis2017-evaluation) defines them, per object per frame.

- J: |pred ∧ gt| / |pred ∨ gt| over the frame; 1 when both are empty. `jaccard` and `f_measure` take an optional
  void mask whose pixels they ignore, as the official functions do; but the official semi-supervised evaluation
  sets 255 in the ground truth to 0 before it looks for void, so there (and in `evaluate_sequence`) a GT 255
  pixel is background: a prediction on it is a false positive.
- F: boundary maps by `seg2bmap`, each dilated by a disk x² + y² ≤ t², t = ceil(0.008 · ‖(H, W)‖);
  precision = |b_pred ∧ dil(b_gt)| / |b_pred|, recall = |b_gt ∧ dil(b_pred)| / |b_gt| with the official edge cases.
- A sequence is scored without its first and last frames; per object: mean, recall (fraction of frames > 0.5) and
  decay (mean of the first quarter minus the last quarter of frames, the official 4-bin rule).
- J&F mean = (mean over objects of per-object J means + the same for F) / 2.
- Objects: every id that appears in any ground-truth frame. The official tool scores ids 1..max(first frame's GT),
  the same set on DAVIS, whose objects are all in the first frame with contiguous ids; with ids {1, 3} it would
  also score an absent object 2 (J = 1 on its empty frames), and it never scores an object that enters later.
"""

from __future__ import annotations

import csv
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

VOID_ID = 255


def _as_bool(name: str, m) -> np.ndarray:
    a = m.cpu().numpy() if hasattr(m, "cpu") else np.asarray(m)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {a.shape}")
    return a.astype(bool)


def _mask_pair(pred, gt, void):
    """pred and gt as same-sized bool masks, with void pixels (if given) cleared in both."""
    p, g = _as_bool("pred", pred), _as_bool("gt", gt)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} must have the same size")
    if void is not None:
        keep = ~_as_bool("void", void)
        p, g = p & keep, g & keep
    return p, g


def jaccard(pred, gt, void=None) -> float:
    """Region similarity J of two binary masks (H, W); 1.0 when both are empty."""
    p, g = _mask_pair(pred, gt, void)
    union = np.count_nonzero(p | g)
    if union == 0:
        return 1.0
    return np.count_nonzero(p & g) / union


def seg2bmap(mask) -> np.ndarray:
    """The official boundary map: b = (m ^ east) | (m ^ south) | (m ^ south-east), shifted masks with zeros entering;
    last row = m ^ east, last column = m ^ south, bottom-right pixel 0."""
    m = _as_bool("mask", mask)
    e = np.zeros_like(m)
    s = np.zeros_like(m)
    se = np.zeros_like(m)
    e[:, :-1] = m[:, 1:]
    s[:-1, :] = m[1:, :]
    se[:-1, :-1] = m[1:, 1:]
    b = (m ^ e) | (m ^ s) | (m ^ se)
    b[-1, :] = m[-1, :] ^ e[-1, :]
    b[:, -1] = m[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """uint8 disk x² + y² ≤ r² of side 2r + 1 (skimage.morphology.disk)."""
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy <= r * r).astype(np.uint8)


def boundary_radius(shape, bound_th: float = 0.008) -> int:
    """t = ceil(0.008 · ‖(H, W)‖) pixels (a threshold ≥ 1 is taken as pixels)."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def f_measure(pred, gt, void=None, bound_th: float = 0.008, return_pr: bool = False):
    """Contour accuracy F of two binary masks (H, W), with (precision, recall) if `return_pr`. bound_th: the
    boundary tolerance, a fraction of the image diagonal when < 1, else pixels."""
    import cv2

    if isinstance(bound_th, bool) or not isinstance(bound_th, (int, float)) or not 0 <= bound_th < math.inf:
        raise ValueError(f"bound_th must be a finite number >= 0, got {bound_th!r}")
    p, g = _mask_pair(pred, gt, void)
    kernel = disk(boundary_radius(p.shape, bound_th))
    bp, bg = seg2bmap(p), seg2bmap(g)
    dil_p = cv2.dilate(bp.astype(np.uint8), kernel).astype(bool)
    dil_g = cv2.dilate(bg.astype(np.uint8), kernel).astype(bool)
    n_p, n_g = np.count_nonzero(bp), np.count_nonzero(bg)
    if n_p == 0 and n_g > 0:
        precision, recall = 1.0, 0.0
    elif n_p > 0 and n_g == 0:
        precision, recall = 0.0, 1.0
    elif n_p == 0 and n_g == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = np.count_nonzero(bp & dil_g) / n_p
        recall = np.count_nonzero(bg & dil_p) / n_g
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return (f, precision, recall) if return_pr else f


def statistics(per_frame) -> tuple[float, float, float]:
    """(mean, recall, decay) of per-frame values, as db_statistics: recall = mean(v > 0.5); decay = mean of the
    first of 4 bins minus the last, bins from round(linspace(1, n, 5)) - 1 (int64 here; the official uint8 cast
    overflows past 255 frames)."""
    v = np.asarray(per_frame, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.nanmean(v))
    recall = float(np.nanmean(v > 0.5))
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


@dataclass
class ObjectScore:
    sequence: str
    object_id: int
    J: list[float] = field(default_factory=list)
    F: list[float] = field(default_factory=list)

    def stats(self) -> dict:
        jm, jr, jd = statistics(self.J)
        fm, fr, fd = statistics(self.F)
        return {"J-Mean": jm, "J-Recall": jr, "J-Decay": jd, "F-Mean": fm, "F-Recall": fr, "F-Decay": fd}


def evaluate_sequence(preds, gts, name: str = "seq", object_ids=None, skip_first_last: bool = True):
    """Per-object J and F for one sequence. `preds`, `gts`: lists of (H, W) id masks (same length; 255 in a GT
    mask counts as background, as in davis2017-evaluation). Object ids default to those present in any GT frame.
    The first and last frames are skipped."""
    if len(preds) != len(gts):
        raise ValueError(f"preds has {len(preds)} frames but gts has {len(gts)}; they must match")
    gts = [np.asarray(g.cpu() if hasattr(g, "cpu") else g) for g in gts]
    preds = [np.asarray(p.cpu() if hasattr(p, "cpu") else p) for p in preds]
    for i, (p, g) in enumerate(zip(preds, gts)):
        if p.shape != g.shape:
            raise ValueError(f"{name} frame {i}: prediction {p.shape} and ground truth {g.shape} differ in size")
    if object_ids is None:
        ids = set()
        for g in gts:
            ids.update(np.unique(g).tolist())
        object_ids = sorted(i for i in ids if i not in (0, VOID_ID))
    frames = range(1, len(gts) - 1) if skip_first_last else range(len(gts))
    scores = []
    for oid in object_ids:
        s = ObjectScore(name, int(oid))
        for t in frames:
            s.J.append(jaccard(preds[t] == oid, gts[t] == oid))
            s.F.append(f_measure(preds[t] == oid, gts[t] == oid))
        scores.append(s)
    return scores


def summarize(scores: list[ObjectScore]) -> dict:
    """Global numbers over objects (of all sequences): J&F-Mean, J/F Mean, Recall, Decay."""
    rows = [s.stats() for s in scores if s.J]
    if not rows:
        raise ValueError("no object has a scored frame (sequences need at least 3 frames and one object)")
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    return out


def _seq_folder_frames(folder: str) -> dict[str, str]:
    from .io.video import frame_sort_key

    return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder), key=frame_sort_key)
            if f.lower().endswith(".png") and not f.startswith(".")}


def _annotation_root(gt: str) -> str:
    for sub in (os.path.join("Annotations", "480p"), "Annotations"):
        if os.path.isdir(os.path.join(gt, sub)):
            return os.path.join(gt, sub)
    return gt


def evaluate_folders(pred_dir: str, gt_dir: str, sequences=None, workers: int | None = None):
    """Evaluate `pred_dir/<seq>/<frame>.png` against the ground truth (a DAVIS root or a folder of sequence folders
    of annotation PNGs). Returns (per-object scores, per-sequence dict {seq: stats}, global summary).
    Sequences are evaluated in parallel threads (OpenCV and NumPy release the GIL)."""
    from .io.masks import read_mask

    gt_root = _annotation_root(gt_dir)
    if not os.path.isdir(gt_root):
        raise ValueError(f"gt {gt_dir!r} is not a folder")
    if not os.path.isdir(pred_dir):
        raise ValueError(f"pred {pred_dir!r} is not a folder")
    if sequences is None:
        sequences = prediction_sequences(pred_dir)
    if not sequences:
        raise ValueError(f"pred {pred_dir!r} holds no sequence folders")

    def one(seq):
        gfolder = os.path.join(gt_root, seq)
        if not os.path.isdir(gfolder):
            raise ValueError(f"sequence {seq!r} has predictions but no ground truth under {gt_root!r}")
        gframes = _seq_folder_frames(gfolder)
        pframes = _seq_folder_frames(os.path.join(pred_dir, seq))
        missing = [n for n in gframes if n not in pframes]
        if missing:
            raise ValueError(f"sequence {seq!r}: no prediction for frame(s) {missing[:5]} in {pred_dir!r}")
        gts = [read_mask(gframes[n]) for n in gframes]
        preds = [read_mask(pframes[n]) for n in gframes]
        return evaluate_sequence(preds, gts, seq)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        per_seq = list(pool.map(one, sequences))
    # A sequence with no scored frame (fewer than 3 frames, or only its first frame annotated, as in DAVIS test-dev)
    # is left out of the table and the summary, not allowed to abort the others: see unscored_sequences.
    scores = [s for seq_scores in per_seq for s in seq_scores if s.J]
    table = {}
    for seq, seq_scores in zip(sequences, per_seq):
        if any(s.J for s in seq_scores):
            table[seq] = summarize(seq_scores)
    return scores, table, summarize(scores)


def prediction_sequences(pred_dir: str) -> list[str]:
    """The sequence folders of a predictions folder, sorted (what evaluate_folders scores by default); hidden
    folders are not sequences."""
    return sorted(d for d in os.listdir(pred_dir) if not d.startswith(".") and os.path.isdir(os.path.join(pred_dir, d)))


def unpredicted_sequences(pred_dir: str, gt_dir: str) -> list[str]:
    """Ground-truth sequences with no predictions folder: evaluate_folders' default leaves them out, so a global
    number over the rest is not the official one over the whole set."""
    gt_root = _annotation_root(gt_dir)
    return [s for s in prediction_sequences(gt_root) if not os.path.isdir(os.path.join(pred_dir, s))]


def unscored_sequences(sequences, table: dict) -> list[str]:
    """The sequences evaluate_folders was given that have no row in its table (no object with a scored frame)."""
    return [s for s in sequences if s not in table]


COLUMNS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]


def format_table(table: dict, summary: dict, unscored=()) -> str:
    """The per-sequence table and the global row; `unscored` (see unscored_sequences) named below it."""
    head = f"{'sequence':<24}" + "".join(f"{c:>10}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for seq, st in table.items():
        lines.append(f"{seq:<24}" + "".join(f"{st[c]:>10.3f}" for c in COLUMNS))
    lines.append("-" * len(head))
    lines.append(f"{'all (mean over objects)':<24}" + "".join(f"{summary[c]:>10.3f}" for c in COLUMNS))
    if unscored:
        lines.append(f"not scored (no object with a frame between the first and the last): {list(unscored)}")
    return "\n".join(lines)


def write_csv(path: str, scores: list[ObjectScore], table: dict, summary: dict) -> None:
    """One row per object (`<seq>_<id>`), one per sequence, and a final `all` row."""
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Sequence", "Level"] + COLUMNS)
        for s in scores:
            st = s.stats()
            st["J&F-Mean"] = (st["J-Mean"] + st["F-Mean"]) / 2
            w.writerow([f"{s.sequence}_{s.object_id}", "object"] + [f"{st[c]:.6f}" for c in COLUMNS])
        for seq, st in table.items():
            w.writerow([seq, "sequence"] + [f"{st[c]:.6f}" for c in COLUMNS])
        w.writerow(["all", "global"] + [f"{summary[c]:.6f}" for c in COLUMNS])
