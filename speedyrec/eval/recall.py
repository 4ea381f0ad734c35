"""Recall@K of news retrieval: each user's vector searches a pool of news vectors by inner product, the news
the user already clicked are left out of the results, and Recall@K is the share of the user's next clicks
(those in the pool) found in the top K, averaged over users with at least one.

Two searches: ``exact`` (a matrix product and top-k, the reference) and ``hnsw`` (faiss's HNSW graph with
inner-product metric, the ``[ann]`` extra), which serves large pools in sub-linear time. ``compare`` runs
both on the same vectors and reports how close the approximate search comes.
"""
from __future__ import annotations

import numpy as np

KS = (50, 100, 200)


def _exclusions(exclude: list[np.ndarray] | None, users: int) -> list[np.ndarray]:
    return [np.zeros(0, dtype=np.int64)] * users if exclude is None else [np.asarray(e, dtype=np.int64) for e in exclude]


def search_exact(users: np.ndarray, pool: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Indices [U, k] of the k pool vectors of highest inner product with each user, best first."""
    k = min(k, len(pool))
    out = np.empty((len(users), k), dtype=np.int64)
    for s in range(0, len(users), chunk):
        scores = users[s:s + chunk] @ pool.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[s:s + chunk] = np.take_along_axis(top, order, axis=1)
    return out


class HNSWIndex:
    """faiss HNSW over the pool, inner-product metric. ``ef_search`` trades speed for recall."""

    def __init__(self, pool: np.ndarray, m: int = 32, ef_construction: int = 200, ef_search: int = 256):
        try:
            import faiss
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the hnsw search needs faiss: pip install 'speedyrec[ann]' (faiss-cpu)") from e
        self.index = faiss.IndexHNSWFlat(pool.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(np.ascontiguousarray(pool, dtype=np.float32))
        self.ef_search = ef_search
        self.size = len(pool)

    def search(self, users: np.ndarray, k: int) -> np.ndarray:
        k = min(k, self.size)
        self.index.hnsw.efSearch = max(self.ef_search, 4 * k)  # the beam must be well above k for inner product
        _, idx = self.index.search(np.ascontiguousarray(users, dtype=np.float32), k)
        return idx.astype(np.int64)  # -1 where the graph found fewer than k


def top_k_excluding(users: np.ndarray, pool: np.ndarray, k: int, exclude: list[np.ndarray] | None = None,
                    method: str = "exact", index: HNSWIndex | None = None) -> list[np.ndarray]:
    """Per user, the top k pool indices (best first) after removing that user's ``exclude`` indices."""
    exclude = _exclusions(exclude, len(users))
    extra = max((len(e) for e in exclude), default=0)
    want = min(k + extra, len(pool))  # enough that k remain after the exclusions
    if method == "exact":
        found = search_exact(users, pool, want)
    elif method == "hnsw":
        found = (index or HNSWIndex(pool)).search(users, want)
    else:
        raise ValueError(f"unknown search method {method!r}: exact | hnsw")
    out = []
    for row, ex in zip(found, exclude):
        row = row[row >= 0]
        out.append(row[~np.isin(row, ex)][:k])
    return out


def recall_at_k(users: np.ndarray, pool: np.ndarray, positives: list[np.ndarray], exclude: list[np.ndarray] | None = None,
                ks=KS, method: str = "exact", index: HNSWIndex | None = None) -> dict:
    """{"recall@K": mean over users with positives, "users": how many counted}; positives and exclusions are
    indices into ``pool``. A positive that is also excluded (clicked before) does not count as findable."""
    exclude = _exclusions(exclude, len(users))
    tops = top_k_excluding(users, pool, max(ks), exclude, method, index)
    per_k = {k: [] for k in ks}
    for top, pos, ex in zip(tops, positives, exclude):
        pos = np.setdiff1d(np.asarray(pos, dtype=np.int64), ex)
        if len(pos) == 0:
            continue
        for k in ks:
            per_k[k].append(np.isin(pos, top[:k]).mean())
    counted = len(per_k[ks[0]])
    return {**{f"recall@{k}": float(np.mean(v)) if v else None for k, v in per_k.items()}, "users": counted}


def compare(users: np.ndarray, pool: np.ndarray, positives, exclude=None, ks=KS, **hnsw) -> dict:
    """Recall@K with exact and with HNSW search on the same vectors, and how much of the exact top K the
    approximate search returns (its own recall of the exact neighbours)."""
    index = HNSWIndex(pool, **hnsw)
    exact = recall_at_k(users, pool, positives, exclude, ks, "exact")
    approx = recall_at_k(users, pool, positives, exclude, ks, "hnsw", index)
    e_top = top_k_excluding(users, pool, max(ks), exclude, "exact")
    a_top = top_k_excluding(users, pool, max(ks), exclude, "hnsw", index)
    overlap = {f"neighbours@{k}": float(np.mean([len(np.intersect1d(e[:k], a[:k])) / max(min(k, len(e)), 1)
                                                 for e, a in zip(e_top, a_top)])) for k in ks}
    return {"exact": exact, "hnsw": approx, **overlap}


def recall_both(users, pool, positives, exclude=None, ks=KS) -> dict:
    """:func:`compare` when faiss is installed; exact search alone (and a note saying so) when it is not."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return {"exact": recall_at_k(users, pool, positives, exclude, ks), "hnsw": None,
                "note": "faiss is not installed (pip install 'speedyrec[ann]'): exact search only"}
    return compare(users, pool, positives, exclude, ks)
