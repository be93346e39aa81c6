"""DAVIS's J (region IoU) and F (boundary F-measure) against cases computed by hand and a brute-force
boundary matcher (distances pixel by pixel), and the sequence / global summary of davis2017-evaluation
(first and last frames left out, means over objects)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ssl_xcit.evaluate.davis_metrics import (boundary_f, dilate_disk, per_frame_jf, region_j, score_frames,
                                             seg2bmap, summarize)


def test_region_j_by_hand():
    gt = np.zeros((4, 4), bool)
    gt[0:2, 0:3] = True                      # 6 pixels
    pred = np.zeros((4, 4), bool)
    pred[0:2, 1:4] = True                    # 6 pixels, 4 shared -> 4 / 8
    assert region_j(pred, gt) == pytest.approx(4 / 8)
    void = np.zeros((4, 4), bool)
    void[:, 3] = True                        # drops 2 predicted pixels from the union -> 4 / 6
    assert region_j(pred, gt, void) == pytest.approx(4 / 6)
    assert region_j(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert region_j(np.ones((3, 3)), np.zeros((3, 3))) == 0.0


def test_seg2bmap_by_hand():
    seg = np.zeros((5, 5), bool)
    seg[1:3, 1:3] = True
    want = np.array([[1, 1, 1, 0, 0],
                     [1, 0, 1, 0, 0],
                     [1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0]], bool)
    assert (seg2bmap(seg) == want).all()


def _brute_dilate(mask: np.ndarray, r: int) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    out = np.zeros_like(mask, bool)
    for y, x in zip(ys, xs):
        out |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    return out


def test_disk_dilation_matches_the_distance_definition():
    one = np.zeros((7, 7), bool)
    one[3, 3] = True
    assert dilate_disk(one, 2).sum() == 13               # (0,0), 4 at 1, 4 diagonals, 4 at 2
    rng = np.random.default_rng(0)
    for r in (1, 3, 8):
        m = rng.random((23, 31)) < 0.02
        m[0, 0] = m[-1, -1] = True                        # borders: outside pixels count as unset
        assert (dilate_disk(m, r) == _brute_dilate(m, r)).all()


def _brute_f(pred, gt, r):
    a, b = seg2bmap(pred), seg2bmap(gt)
    pa, pb = np.argwhere(a), np.argwhere(b)
    if len(pa) == 0 or len(pb) == 0:
        p = 1.0 if len(pa) == 0 else 0.0
        q = 1.0 if len(pb) == 0 else 0.0
    else:
        d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
        p, q = (d.min(1) <= r).mean(), (d.min(0) <= r).mean()
    return 0.0 if p + q == 0 else 2 * p * q / (p + q)


def test_boundary_f_by_hand_and_by_brute_force():
    gt = np.zeros((20, 20), bool)
    gt[:, :10] = True                     # boundary: column 9
    pred = np.zeros((20, 20), bool)
    pred[:, :13] = True                   # boundary: column 12, 3 px away
    assert boundary_f(pred, gt, bound_th=2) == 0.0
    assert boundary_f(pred, gt, bound_th=3) == 1.0
    assert boundary_f(np.zeros_like(gt), gt, bound_th=3) == 0.0
    assert boundary_f(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    # an L-shaped boundary: against the brute-force matcher
    pred2 = gt.copy()
    pred2[10:, 10:13] = True
    assert boundary_f(pred2, gt, bound_th=2) == pytest.approx(_brute_f(pred2, gt, 2))
    rng = np.random.default_rng(1)
    for _ in range(3):
        a = np.zeros((30, 40), bool)
        b = np.zeros((30, 40), bool)
        y, x = rng.integers(3, 12, 2)
        a[y:y + 12, x:x + 15] = True
        b[y + rng.integers(-3, 4):y + 10, x:x + 18 + rng.integers(-4, 4)] = True
        assert boundary_f(a, b, bound_th=2) == pytest.approx(_brute_f(a, b, 2))


def test_davis_radius_is_0008_of_the_diagonal():
    # 480x854: ceil(0.008 * 979.6) = 8 px; a boundary 8 px away matches, 9 px away does not
    assert math.ceil(0.008 * math.hypot(480, 854)) == 8
    gt = np.zeros((480, 854), bool)
    gt[:, :400] = True
    for shift, want in ((8, 1.0), (9, 0.0)):
        pred = np.zeros_like(gt)
        pred[:, :400 + shift] = True
        assert boundary_f(pred, gt) == want


def test_sequences_leave_out_first_and_last_frames_and_average_objects():
    full = np.zeros((6, 6), np.uint8)
    full[1:5, 1:5] = 1
    garbage = np.full((6, 6), 3, np.uint8)
    empty = np.zeros((6, 6), np.uint8)
    # A: one object, 4 frames; scored frames 1 (perfect) and 2 (empty): J = F = 0.5
    a_gt = [full] * 4
    a_pred = [garbage, full, empty, garbage]             # first and last are not scored
    # B: two objects, 3 frames; frame 1: object 1 perfect, object 2 missed
    two = full.copy()
    two[1:5, 3:5] = 2
    b_gt = [two] * 3
    b_pred = [garbage, np.where(two == 1, 1, 0).astype(np.uint8), garbage]
    per_seq = {"a": score_frames(a_pred, a_gt), "b": score_frames(b_pred, b_gt)}
    assert per_seq["a"]["J"].tolist() == [[1.0, 0.0]] and per_seq["b"]["J"].tolist() == [[1.0], [0.0]]
    s = summarize(per_seq)
    assert s["J-Mean"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)    # mean over the 3 objects
    assert s["F-Mean"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert s["sequences"]["b"]["J"] == pytest.approx(0.5) and s["sequences"]["a"]["frames_scored"] == 2
    assert s["J&F-Mean"] == pytest.approx(0.5)
    assert per_frame_jf(per_seq).tolist() == [1.0, 0.0, 0.5]
    # half an object: J = 2 / 4 pixels
    half = full.copy()
    half[1:5, 1:3] = 0
    assert score_frames([full, half, full], [full] * 3)["J"][0, 0] == pytest.approx(8 / 16)
    # void pixels (255) are left out of J
    gt_void = full.copy()
    gt_void[1:5, 3:5] = 255
    assert score_frames([full, half, full], [full, gt_void, full])["J"][0, 0] == pytest.approx(0.0)
    assert score_frames([full, full, full], [full, gt_void, full])["J"][0, 0] == pytest.approx(1.0)
