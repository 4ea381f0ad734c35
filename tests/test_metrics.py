"""Tests for speedyrec.eval.metrics (vectorised MIND ranking metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import ndcg_score, roc_auc_score

from speedyrec.eval.metrics import (
    METRIC_NAMES,
    _descending_order,
    impression_metrics,
    metric_sums,
    metrics_from_sums,
    summarize,
)

INV_LOG2_3 = 1.0 / math.log2(3.0)  # discount of rank 2


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _flatten(impressions):
    """[(scores, labels), ...] -> (scores [M], labels [M], offsets [I+1])."""
    sizes = [len(s) for s, _ in impressions]
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    if impressions and sum(sizes):
        scores = np.concatenate([np.asarray(s, dtype=np.float64) for s, _ in impressions])
        labels = np.concatenate([np.asarray(y, dtype=np.int64) for _, y in impressions])
    else:
        scores = np.zeros(0, dtype=np.float64)
        labels = np.zeros(0, dtype=np.int64)
    return scores, labels, offsets


def _single(scores, labels):
    s, y, off = _flatten([(scores, labels)])
    out = impression_metrics(s, y, off)
    return {k: v[0] for k, v in out.items()}


def _ref_order(scores):
    """Indices by score descending, equal scores by original position."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _ref_mrr(scores, labels):
    """Slow, literal MRR: mean over positives of 1 / (1-based rank)."""
    total = 0.0
    for rank, i in enumerate(_ref_order(scores), start=1):
        if labels[i] == 1:
            total += 1.0 / rank
    return total / sum(labels)


def _ref_ndcg(scores, labels, k):
    """Slow nDCG@k with the same stable tie-break."""
    dcg = 0.0
    for rank, i in enumerate(_ref_order(scores)[:k], start=1):
        dcg += (2 ** labels[i] - 1) / math.log2(rank + 1)
    ideal = sorted(labels, reverse=True)[:k]
    idcg = sum((2**g - 1) / math.log2(r + 1) for r, g in enumerate(ideal, start=1))
    return dcg / idcg


def _ref_auc(scores, labels):
    """Slow pairwise AUC, ties worth 1/2."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _random_impressions(rng, n_imp, max_size=40, tied=False):
    imps = []
    for _ in range(n_imp):
        n = int(rng.integers(0, max_size + 1))
        if tied:
            # few distinct values -> many ties / duplicates
            s = rng.integers(0, int(rng.integers(1, 5)), size=n) / 4.0
        else:
            s = rng.standard_normal(n)
        p = rng.choice([0.05, 0.2, 0.5, 0.9])
        y = (rng.random(n) < p).astype(np.int64)
        imps.append((s, y))
    return imps


# --------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------
def test_single_positive_ranked_first():
    m = _single([0.9, 0.1, 0.5], [1, 0, 0])
    assert m["valid"]
    assert m["auc"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx(1.0)
    assert m["ndcg5"] == pytest.approx(1.0)
    assert m["ndcg10"] == pytest.approx(1.0)


def test_single_positive_ranked_last():
    # order by score: 0.9 (y=0), 0.5 (y=0), 0.1 (y=1) -> the positive is rank 3
    m = _single([0.9, 0.1, 0.5], [0, 1, 0])
    assert m["auc"] == pytest.approx(0.0)
    assert m["mrr"] == pytest.approx(1.0 / 3.0)
    # DCG = 1/log2(3+1) = 0.5, ideal DCG = 1/log2(2) = 1
    assert m["ndcg5"] == pytest.approx(0.5)
    assert m["ndcg10"] == pytest.approx(0.5)


def test_two_positives_by_hand():
    # scores 0.4 0.8 0.5 0.1 0.3, labels 1 0 1 0 0
    # descending: 0.8(y0) 0.5(y1) 0.4(y1) 0.3(y0) 0.1(y0) -> y_sorted 0 1 1 0 0
    # AUC: positives {0.5, 0.4}, negatives {0.8, 0.3, 0.1};
    #      0.5 beats 0.3, 0.1 (2 wins); 0.4 beats 0.3, 0.1 (2 wins) -> 4 / (2*3) = 2/3
    # MRR: positives at ranks 2 and 3 -> (1/2 + 1/3) / 2 = 5/12
    # DCG: 1/log2(2+1) + 1/log2(3+1) = 1/log2(3) + 1/2 ~= 0.6309 + 0.5 = 1.1309
    # IDCG (both positives first): 1/log2(2) + 1/log2(3) = 1 + 0.6309 = 1.6309
    # nDCG@5 = nDCG@10 = 1.1309 / 1.6309 ~= 0.69343
    m = _single([0.4, 0.8, 0.5, 0.1, 0.3], [1, 0, 1, 0, 0])
    assert m["auc"] == pytest.approx(2.0 / 3.0)
    assert m["mrr"] == pytest.approx(5.0 / 12.0)
    expected = (INV_LOG2_3 + 0.5) / (1.0 + INV_LOG2_3)
    assert expected == pytest.approx(0.69343, abs=1e-5)
    assert m["ndcg5"] == pytest.approx(expected)
    assert m["ndcg10"] == pytest.approx(expected)


def test_ndcg_cutoff_by_hand():
    # 7 candidates, only positive at rank 6 (score 0.2): outside top 5, inside top 10
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.2, 0.1]
    labels = [0, 0, 0, 0, 0, 1, 0]
    m = _single(scores, labels)
    assert m["ndcg5"] == 0.0
    assert m["ndcg10"] == pytest.approx(1.0 / math.log2(7.0))  # rank 6 -> log2(6+1)
    assert m["mrr"] == pytest.approx(1.0 / 6.0)
    assert m["auc"] == pytest.approx(1.0 / 6.0)  # beats only the 0.1 negative


def test_tie_auc_is_half_and_rank_ties_break_by_position():
    # identical scores: AUC = 1/2 regardless of label order
    a = _single([0.5, 0.5], [1, 0])
    b = _single([0.5, 0.5], [0, 1])
    assert a["auc"] == pytest.approx(0.5)
    assert b["auc"] == pytest.approx(0.5)
    # stable tie-break: the earlier candidate ranks first
    assert a["mrr"] == pytest.approx(1.0)
    assert a["ndcg5"] == pytest.approx(1.0)
    assert b["mrr"] == pytest.approx(0.5)
    assert b["ndcg5"] == pytest.approx(INV_LOG2_3)


def test_partial_ties_auc():
    # pos {0.3, 0.7}, neg {0.7, 0.3}: pairs 0.3v0.7=0, 0.3v0.3=.5, 0.7v0.7=.5, 0.7v0.3=1
    m = _single([0.3, 0.7, 0.3, 0.7], [1, 0, 0, 1])
    assert m["auc"] == pytest.approx(2.0 / 4.0)
    # all-tied 3 candidates with 1 positive: AUC still 1/2
    assert _single([1.0, 1.0, 1.0], [0, 1, 0])["auc"] == pytest.approx(0.5)
    # -0.0 and 0.0 are the same score
    assert _single([0.0, -0.0], [1, 0])["auc"] == pytest.approx(0.5)


def test_float32_bool_and_inf_inputs():
    s = np.array([np.inf, 0.25, -np.inf, 0.25], dtype=np.float32)
    y = np.array([False, True, False, True])
    out = impression_metrics(s, y, np.array([0, 4]))
    # each positive (0.25) loses to +inf and beats -inf -> AUC 1/2 (sklearn rejects inf)
    assert out["auc"][0] == pytest.approx(0.5)
    assert out["auc"][0] == pytest.approx(_ref_auc(list(s), list(y.astype(int))))
    # order: +inf, 0.25 (idx 1), 0.25 (idx 3), -inf -> positives at ranks 2, 3
    assert out["mrr"][0] == pytest.approx((1.0 / 2.0 + 1.0 / 3.0) / 2.0)
    assert out["mrr"][0] == pytest.approx(_ref_mrr(list(s), list(y.astype(int))))


# --------------------------------------------------------------------------
# against scikit-learn / slow references
# --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_against_references_random(seed, tied):
    rng = np.random.default_rng(seed)
    imps = _random_impressions(rng, 150, max_size=60, tied=tied)
    s, y, off = _flatten(imps)
    out = impression_metrics(s, y, off)
    n_checked = 0
    for i, (si, yi) in enumerate(imps):
        valid = 0 < yi.sum() < len(yi)
        assert out["valid"][i] == valid
        if not valid:
            for name in METRIC_NAMES:
                assert np.isnan(out[name][i])
            continue
        n_checked += 1
        assert out["auc"][i] == pytest.approx(roc_auc_score(yi, si), abs=1e-12)
        assert out["mrr"][i] == pytest.approx(_ref_mrr(list(si), list(yi)), abs=1e-12)
        for name, k in (("ndcg5", 5), ("ndcg10", 10)):
            assert out[name][i] == pytest.approx(_ref_ndcg(list(si), list(yi), k), abs=1e-12)
            if len(np.unique(si)) == len(si):  # sklearn averages ties; compare only tie-free
                assert out[name][i] == pytest.approx(ndcg_score([yi], [si], k=k), abs=1e-12)
    assert n_checked > 50


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from([-1.0, 0.0, 0.5, 0.5, 2.0, 3.25]), st.integers(0, 1)),
            min_size=0,
            max_size=25,
        ),
        min_size=0,
        max_size=8,
    )
)
def test_against_references_hypothesis(raw):
    imps = [([s for s, _ in r], [y for _, y in r]) for r in raw]
    s, y, off = _flatten(imps)
    out = impression_metrics(s, y, off)
    assert out["valid"].shape == (len(imps),)
    for i, (si, yi) in enumerate(imps):
        if not (0 < sum(yi) < len(yi)):
            assert not out["valid"][i]
            assert all(np.isnan(out[name][i]) for name in METRIC_NAMES)
            continue
        assert out["valid"][i]
        assert out["auc"][i] == pytest.approx(_ref_auc(si, yi), abs=1e-12)
        assert out["auc"][i] == pytest.approx(roc_auc_score(yi, si), abs=1e-12)
        assert out["mrr"][i] == pytest.approx(_ref_mrr(si, yi), abs=1e-12)
        assert out["ndcg5"][i] == pytest.approx(_ref_ndcg(si, yi, 5), abs=1e-12)
        assert out["ndcg10"][i] == pytest.approx(_ref_ndcg(si, yi, 10), abs=1e-12)


def test_grouped_sort_matches_lexsort():
    rng = np.random.default_rng(7)
    imps = _random_impressions(rng, 300, max_size=50, tied=True)
    s, _, off = _flatten(imps)
    sizes = np.diff(off)
    gid = np.repeat(np.arange(len(imps)), sizes)
    expected = np.lexsort((np.arange(s.size), -s, gid))
    np.testing.assert_array_equal(_descending_order(s, off, sizes), expected)


# --------------------------------------------------------------------------
# validity, summaries, distributed sums
# --------------------------------------------------------------------------
def test_single_class_and_empty_excluded():
    imps = [
        ([0.9, 0.1, 0.5], [1, 0, 0]),  # valid: all metrics 1
        ([0.2, 0.3], [0, 0]),  # no positive
        ([], []),  # empty
        ([0.4, 0.6], [1, 1]),  # no negative
        ([0.9, 0.1, 0.5], [0, 1, 0]),  # valid: auc 0, mrr 1/3, ndcg 0.5
        ([0.7], [1]),  # single candidate
    ]
    out = impression_metrics(*_flatten(imps))
    np.testing.assert_array_equal(out["valid"], [True, False, False, False, True, False])
    for name in METRIC_NAMES:
        assert out[name].dtype == np.float64
        assert out[name].shape == (6,)
        assert np.isnan(out[name][~out["valid"]]).all()
    summ = summarize(out)
    assert summ["impressions"] == 2
    assert summ["impressions_single_class"] == 4
    assert summ["auc"] == pytest.approx(0.5)
    assert summ["mrr"] == pytest.approx((1.0 + 1.0 / 3.0) / 2.0)
    assert summ["ndcg5"] == pytest.approx(0.75)
    assert summ["ndcg10"] == pytest.approx(0.75)
    assert not any(math.isnan(summ[name]) for name in METRIC_NAMES)


def test_no_valid_impressions_gives_nan_means():
    for imps in ([], [([], [])], [([0.1, 0.2], [1, 1])]):
        summ = summarize(impression_metrics(*_flatten(imps)))
        assert summ["impressions"] == 0
        assert summ["impressions_single_class"] == len(imps)
        assert all(math.isnan(summ[name]) for name in METRIC_NAMES)


def test_sums_round_trip_and_two_halves():
    rng = np.random.default_rng(3)
    imps = _random_impressions(rng, 400, max_size=30, tied=True)
    full = impression_metrics(*_flatten(imps))
    summ = summarize(full)

    vec = metric_sums(full)
    assert vec.dtype == np.float64 and vec.shape == (6,)
    assert metrics_from_sums(vec) == summ
    # means agree with a direct nanmean
    for name in METRIC_NAMES:
        assert summ[name] == pytest.approx(np.nanmean(full[name]), rel=1e-12)

    # two "processes" each evaluate half, then sum their vectors
    half = 173
    v1 = metric_sums(impression_metrics(*_flatten(imps[:half])))
    v2 = metric_sums(impression_metrics(*_flatten(imps[half:])))
    combined = metrics_from_sums(v1 + v2)
    assert combined["impressions"] == summ["impressions"]
    assert combined["impressions_single_class"] == summ["impressions_single_class"]
    assert combined["impressions"] + combined["impressions_single_class"] == len(imps)
    for name in METRIC_NAMES:
        assert combined[name] == pytest.approx(summ[name], rel=1e-12)


def test_metrics_from_sums_rejects_bad_shape():
    with pytest.raises(ValueError):
        metrics_from_sums(np.zeros(5))


@pytest.mark.parametrize(
    "scores, labels, offsets",
    [
        ([0.1, np.nan], [0, 1], [0, 2]),  # NaN score
        ([0.1, 0.2], [0, 2], [0, 2]),  # non-binary label
        ([0.1, 0.2], [0, 1], [0, 1]),  # offsets do not cover all candidates
        ([0.1, 0.2], [0, 1], [1, 2]),  # offsets do not start at 0
        ([0.1, 0.2, 0.3], [0, 1, 0], [0, 2, 1, 3]),  # decreasing offsets
        ([0.1, 0.2], [0, 1, 1], [0, 2]),  # length mismatch
    ],
)
def test_invalid_inputs_raise(scores, labels, offsets):
    with pytest.raises(ValueError):
        impression_metrics(np.asarray(scores), np.asarray(labels), np.asarray(offsets))


# --------------------------------------------------------------------------
# scale smoke test (no timing assertion: catches accidental quadratic paths)
# --------------------------------------------------------------------------
def test_scale_smoke_50k_impressions():
    rng = np.random.default_rng(11)
    n_imp = 50_000
    sizes = rng.integers(1, 80, size=n_imp)
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    m = int(offsets[-1])
    scores = rng.standard_normal(m).astype(np.float32)
    labels = (rng.random(m) < 0.05).astype(np.int8)
    out = impression_metrics(scores, labels, offsets)
    summ = summarize(out)
    assert summ["impressions"] + summ["impressions_single_class"] == n_imp
    assert summ["impressions"] > 0
    for name in METRIC_NAMES:
        vals = out[name][out["valid"]]
        assert np.all((vals >= 0.0) & (vals <= 1.0))
    # random scores -> AUC near 1/2 on average
    assert 0.45 < summ["auc"] < 0.55
