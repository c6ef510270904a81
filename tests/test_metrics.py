"""vosops.metrics: J, F (official boundary rule and edge cases) and the sequence statistics on hand-built cases."""

import numpy as np
import pytest

from vosops import metrics as M


def _square(H, W, y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_jaccard_known_values():
    a = _square(8, 8, 0, 4, 0, 4)  # 16 px
    b = _square(8, 8, 2, 6, 2, 6)  # 16 px, overlap 4
    assert M.jaccard(a, b) == pytest.approx(4 / 28)
    assert M.jaccard(a, a) == 1.0
    assert M.jaccard(np.zeros((5, 5)), np.zeros((5, 5))) == 1.0  # both empty
    assert M.jaccard(a, np.zeros((8, 8))) == 0.0
    void = _square(8, 8, 0, 8, 4, 8)  # void hides b's part right of column 4
    assert M.jaccard(a, b, void) == pytest.approx(4 / 20)


def test_seg2bmap_hand_computed():
    m = _square(5, 5, 1, 3, 1, 3)
    want = np.array([[1, 1, 1, 0, 0],
                     [1, 0, 1, 0, 0],
                     [1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(M.seg2bmap(m), want)
    # last row uses m ^ east only, last column m ^ south only, bottom-right is 0: a full mask has no boundary
    assert not M.seg2bmap(np.ones((4, 6), bool)).any()
    last = np.zeros((3, 3), bool)
    last[2, 0] = True  # bottom-left pixel: last-row rule b[2,0] = 1 ^ east(0); b[1,0] from its south
    np.testing.assert_array_equal(M.seg2bmap(last), np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0]], bool))
    corner = np.zeros((3, 3), bool)
    corner[0, 2] = True  # top-right: last column rule b[0,2] = 1 ^ south(0); b[0,1] from east
    np.testing.assert_array_equal(M.seg2bmap(corner), np.array([[0, 1, 1], [0, 0, 0], [0, 0, 0]], bool))


def test_disk_and_radius():
    d = M.disk(2)
    assert d.shape == (5, 5) and d.sum() == 13  # x²+y² ≤ 4: 1 + 4 + 4 + 4 (includes (±2,0),(0,±2))
    assert M.boundary_radius((480, 854)) == 8  # ceil(0.008 * 979.6)
    assert M.boundary_radius((10, 10)) == 1
    assert M.boundary_radius((100, 100)) == 2
    assert M.boundary_radius((10, 10), bound_th=3) == 3


def test_f_measure_known_value():
    gt = _square(10, 10, 2, 6, 2, 6)  # boundary: 5x5 ring minus 3x3 interior = 16 px
    pred = gt.copy()
    pred[8, 8] = True  # adds 4 boundary px far (> t = 1) from gt's boundary
    f, p, r = M.f_measure(pred, gt, return_pr=True)
    assert p == pytest.approx(16 / 20) and r == 1.0
    assert f == pytest.approx(2 * 0.8 / 1.8)
    assert M.jaccard(pred, gt) == pytest.approx(16 / 17)
    # one-pixel shift is within the tolerance t = 1 -> F = 1, while J drops
    shifted = _square(10, 10, 2, 6, 3, 7)
    assert M.f_measure(shifted, gt) == 1.0
    assert M.jaccard(shifted, gt) == pytest.approx(12 / 20)


def test_f_measure_edge_cases():
    gt = _square(20, 20, 5, 10, 5, 10)
    empty = np.zeros((20, 20), bool)
    assert M.f_measure(empty, gt, return_pr=True) == (0.0, 1.0, 0.0)  # no predicted boundary: P=1, R=0
    assert M.f_measure(gt, empty, return_pr=True) == (0.0, 0.0, 1.0)  # no GT boundary: P=0, R=1
    assert M.f_measure(empty, empty, return_pr=True) == (1.0, 1.0, 1.0)
    far = _square(20, 20, 14, 19, 14, 19)  # both boundaries exist, no match: P + R = 0 -> F = 0
    assert M.f_measure(far, gt, return_pr=True) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same size"):
        M.f_measure(gt, np.zeros((5, 5)))
    with pytest.raises(ValueError, match="2-D"):
        M.jaccard(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


def test_statistics_official_bins():
    m, r, d = M.statistics([1, 1, 1, 1, 0, 0, 0, 0])
    assert (m, r, d) == (0.5, 0.5, 1.0)
    m, r, d = M.statistics([0.2, 0.6, 0.9])
    assert m == pytest.approx(1.7 / 3) and r == pytest.approx(2 / 3)
    # n = 3: ids = round(linspace(1, 3, 5)) - 1 = [0, 1, 1, 2, 2] -> first bin v[0:2], last bin v[2:3]
    assert d == pytest.approx((0.2 + 0.6) / 2 - 0.9)


def test_evaluate_sequence_skips_first_last_and_objects():
    T, H, W = 5, 20, 20
    gts = []
    for t in range(T):
        g = np.zeros((H, W), np.uint8)
        g[2:8, 2 + t:8 + t] = 3  # ids need not be contiguous
        if t >= 2:
            g[12:18, 12:18] = 7  # an object that appears later
        gts.append(g)
    preds = [g.copy() for g in gts]
    preds[0][:] = 0
    preds[-1][:] = 7  # first and last frames are not scored
    scores = M.evaluate_sequence(preds, gts, "s")
    assert [s.object_id for s in scores] == [3, 7]
    assert all(len(s.J) == 3 for s in scores)
    summ = M.summarize(scores)
    assert summ["J&F-Mean"] == 1.0 and summ["J-Decay"] == 0.0
    # object 7 absent in frame 1 of the GT and the prediction: J = 1 there (both empty)
    preds[2][12:18, 12:18] = 0  # miss object 7 at frame 2 -> J 0, F 0 on that frame
    s7 = M.evaluate_sequence(preds, gts, "s")[1]
    assert s7.J == [1.0, 0.0, 1.0] and s7.F == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="frames"):
        M.evaluate_sequence(preds[:-1], gts)


def test_ground_truth_255_is_background_as_in_davis2017_evaluation():
    # davis2017-evaluation zeroes GT 255 before it builds its void mask (then always empty): a prediction over a
    # GT 255 band is a false positive
    g = np.zeros((3, 40, 40), np.uint8)
    g[:, 10:20, 10:20] = 1
    g[:, 20:22, 10:20] = 255
    pred = np.zeros_like(g)
    pred[:, 10:22, 10:20] = 1
    (s,) = M.evaluate_sequence(list(pred), list(g))
    assert s.object_id == 1 and s.J == [pytest.approx(100 / 120)]
    assert s.F == [pytest.approx(M.f_measure(pred[1] == 1, g[1] == 1))] and s.F[0] < 1
    assert M.jaccard(pred[1], g[1] == 1, void=g[1] == 255) == 1.0  # the functions' own void argument still works


def test_evaluate_folders_and_csv(tmp_path):
    from vosops.io import write_mask

    for seq, shift in (("a", 0), ("b", 2)):
        for t in range(4):
            g = np.zeros((16, 16), np.uint8)
            g[4:10, 4:10] = 1
            p = np.zeros((16, 16), np.uint8)
            p[4:10, 4 + shift:10 + shift] = 1
            write_mask(str(tmp_path / "gt" / "Annotations" / "480p" / seq / f"{t:05d}.png"), g)
            write_mask(str(tmp_path / "pred" / seq / f"{t:05d}.png"), p)
    scores, table, summary = M.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), workers=2)
    assert table["a"]["J-Mean"] == 1.0
    assert table["b"]["J-Mean"] == pytest.approx(24 / 48)
    assert summary["J-Mean"] == pytest.approx(0.75)
    M.write_csv(str(tmp_path / "out.csv"), scores, table, summary)
    text = (tmp_path / "out.csv").read_text().splitlines()
    assert text[0].startswith("Sequence,Level,J&F-Mean") and text[-1].startswith("all,global")
    assert "a_1,object" in text[1]
    (tmp_path / "pred" / "a" / "00002.png").unlink()
    with pytest.raises(ValueError, match="no prediction"):
        M.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"))


def test_a_sequence_without_a_scored_frame_does_not_abort_the_others(tmp_path, capsys):
    """A 2-frame sequence, and one annotated only on its first frame (DAVIS test-dev), have no frame between the
    first and the last to score: they are left out and named, the others are scored (the whole evaluation used to
    fail with "no object has a scored frame")."""
    from vosops import cli
    from vosops.io import write_mask

    g = np.zeros((16, 16), np.uint8)
    g[4:10, 4:10] = 1
    for seq, frames in (("long", 4), ("short", 2), ("first_only", 4)):
        for t in range(frames):
            write_mask(str(tmp_path / "pred" / seq / f"{t:05d}.png"), g)
            if seq != "first_only" or t == 0:
                write_mask(str(tmp_path / "gt" / seq / f"{t:05d}.png"), g)
    scores, table, summary = M.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"))
    assert list(table) == ["long"] and summary["J-Mean"] == 1.0
    assert [(s.sequence, s.object_id) for s in scores] == [("long", 1)]
    assert M.unscored_sequences(M.prediction_sequences(str(tmp_path / "pred")), table) == ["first_only", "short"]
    assert cli.main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 0
    out = capsys.readouterr().out
    assert "not scored (no object with a frame between the first and the last): ['first_only', 'short']" in out
    rows = (tmp_path / "pred" / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["long_1", "long", "all"]
    # a ground-truth sequence without predictions is named too (the mean is then not over the whole set)
    write_mask(str(tmp_path / "gt" / "unseen" / "00000.png"), g)
    assert M.unpredicted_sequences(str(tmp_path / "pred"), str(tmp_path / "gt")) == ["unseen"]
    assert cli.main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 0
    assert "ground truth without predictions (not scored; the mean is over the others): ['unseen']" in \
        capsys.readouterr().out


def test_evaluation_bad_input(tmp_path):
    from vosops.io import write_mask

    g = np.zeros((8, 8), np.uint8)
    g[2:5, 2:5] = 1
    with pytest.raises(ValueError, match=r"s frame 1: prediction \(8, 7\) and ground truth \(8, 8\) differ in size"):
        M.evaluate_sequence([g, g[:, :7], g], [g, g, g], "s")
    with pytest.raises(ValueError, match="no object has a scored frame"):
        M.summarize(M.evaluate_sequence([g, g], [g, g], "two frames"))  # first and last are not scored
    assert all(np.isnan(M.statistics([])))
    for th in (-0.5, float("nan"), float("inf"), "0.008", True):
        with pytest.raises(ValueError, match="bound_th must be a finite number >= 0"):
            M.f_measure(g, g, bound_th=th)
    (tmp_path / "pred").mkdir()
    with pytest.raises(ValueError, match="is not a folder"):
        M.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "no-gt"))
    (tmp_path / "gt").mkdir()
    with pytest.raises(ValueError, match="holds no sequence folders"):
        M.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"))
    write_mask(str(tmp_path / "pred" / "cows" / "00000.png"), g)
    with pytest.raises(ValueError, match="sequence 'cows' has predictions but no ground truth"):
        M.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"))


def test_recall_counts_frames_strictly_above_one_half():
    """db_statistics' recall is mean(v > 0.5), strict."""
    assert M.statistics([0.5, 0.5, 1.0, 0.0])[1] == 0.25


def test_bound_th_of_one_is_one_pixel():
    """A bound_th >= 1 is taken as pixels, 1 included."""
    assert M.boundary_radius((480, 854), 1) == 1
    a = np.zeros((40, 40), bool)
    a[10:30, 10:30] = True
    b = np.zeros((40, 40), bool)
    b[12:32, 10:30] = True  # boundary shifted by 2 px: not matched within 1 px
    assert M.f_measure(a, b, bound_th=1) < 0.9
    assert M.f_measure(a, b, bound_th=2) == 1.0
