"""Export and Recall@K: the exported vectors reproduce the run's evaluation; exact search equals a brute-force
sort; HNSW search comes within 1 point of exact recall on 10k vectors; the SpeedyRec sample's daily pools."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_overrides
from speedyrec.eval.recall import compare, recall_at_k, search_exact, top_k_excluding
from speedyrec.export import main as export_main
from speedyrec.train import main as train_main


def clustered(n, dim=32, clusters=50, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    label = rng.integers(0, clusters, n)
    return (centres[label] + 0.6 * rng.normal(size=(n, dim))).astype(np.float32), label, centres


def test_exact_search_equals_a_full_sort():
    rng = np.random.default_rng(1)
    users, pool = rng.normal(size=(30, 8)), rng.normal(size=(500, 8))
    got = search_exact(users, pool, 20, chunk=7)
    ref = np.argsort(-(users @ pool.T), axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(got, ref)


def test_exclusions_never_come_back_and_k_remain():
    rng = np.random.default_rng(2)
    users, pool = rng.normal(size=(10, 8)), rng.normal(size=(300, 8))
    exclude = [search_exact(users[i:i + 1], pool, 15)[0] for i in range(10)]  # the best 15 of each user
    for method in ("exact", "hnsw"):
        pytest.importorskip("faiss") if method == "hnsw" else None
        tops = top_k_excluding(users, pool, 50, exclude, method)
        for top, ex in zip(tops, exclude):
            assert len(top) == 50 and not np.isin(top, ex).any()


def test_recall_by_hand():
    pool = np.eye(4, dtype=np.float32)
    users = np.array([[4, 3, 2, 1]], dtype=np.float32)  # ranks news 0 > 1 > 2 > 3
    r = recall_at_k(users, pool, [np.array([1, 3])], [np.array([0])], ks=(1, 2, 3))
    # news 0 is excluded: the top is 1, 2, 3
    assert r == {"recall@1": 0.5, "recall@2": 0.5, "recall@3": 1.0, "users": 1}
    assert recall_at_k(users, pool, [np.array([0])], [np.array([0])], ks=(1,))["users"] == 0  # only an excluded positive


def test_hnsw_recall_within_one_point_of_exact_on_10k_vectors():
    pytest.importorskip("faiss")
    pool, label, centres = clustered(10_000)
    rng = np.random.default_rng(3)
    n_users = 400
    topic = rng.integers(0, len(centres), n_users)
    users = (centres[topic] + 0.3 * rng.normal(size=(n_users, pool.shape[1]))).astype(np.float32)
    members = [np.flatnonzero(label == t) for t in topic]
    positives = [rng.choice(m, 5, replace=False) for m in members]
    exclude = [rng.choice(m, 10, replace=False) for m in members]
    r = compare(users, pool, positives, exclude)
    for k in (50, 100, 200):
        exact, approx = r["exact"][f"recall@{k}"], r["hnsw"][f"recall@{k}"]
        assert 0.0 < exact < 1.0  # neither trivial nor hopeless, so the comparison says something
        assert abs(approx - exact) <= 0.01, (k, exact, approx)
        assert r[f"neighbours@{k}"] >= 0.95


def test_export_reproduces_the_evaluation_and_recall(tmp_path, cache_dir, synthetic_small, capsys):
    run = tmp_path / "run"
    argv = tiny_overrides(run, cache_dir, "data.format=synthetic", f"data.dir={synthetic_small}",
                          "data.title_tokens=16", "train.max_steps=3", "eval.max_impressions=60")
    assert train_main(argv) == 0
    assert export_main([str(run)]) == 0
    out = run / "export"
    s = json.loads((out / "export.json").read_text())
    evaluated = json.loads((run / "metrics.json").read_text())
    for k in ("auc", "mrr", "ndcg5", "ndcg10"):  # scores from the written vectors alone give the same metrics
        assert s["dev_metrics"][k] == pytest.approx(evaluated[k], abs=1e-6), k
    news = np.load(out / "news_vectors.npy")
    ids = (out / "news_ids.txt").read_text().split()
    assert news.shape == (len(ids), 32) and len(set(ids)) == len(ids) and np.isfinite(news).all()
    users = np.load(out / "user_vectors.npy")
    lines = (out / "prediction.txt").read_text().splitlines()
    assert users.shape[0] == len(lines) == s["impressions"] == evaluated["impressions"]
    for line in lines:
        pos, ranks = line.split(" ")
        ranks = json.loads(ranks)
        assert sorted(ranks) == list(range(1, len(ranks) + 1))  # a permutation: every candidate ranked once
    rec = s["recall_dev"]
    assert rec["exact"]["users"] > 0 and all(0 <= rec["exact"][f"recall@{k}"] <= 1 for k in (50, 100, 200))


def test_export_daily_recall_on_the_speedyrec_sample(tmp_path, cache_dir, speedyrec_sample):
    pytest.importorskip("faiss")
    run = tmp_path / "run"
    assert train_main(tiny_overrides(run, cache_dir, "data.format=speedyrec", f"data.dir={speedyrec_sample}",
                                     "data.title_tokens=16", "train.max_steps=1", "eval.max_impressions=20")) == 0
    daily = speedyrec_sample / "testdata" / "daily_recall"
    assert export_main([str(run), "--daily-recall", str(daily)]) == 0
    s = json.loads((run / "export" / "export.json").read_text())["recall_daily"]
    assert sorted(s) == ["1", "2"]
    for day in s.values():
        assert day["users"] == 100
        assert day["pool_unknown"] < day["pool_ids"]  # most of the pool is in DocFeatures, the rest is counted
        # every click is accounted for: findable in the pool, outside it, or an id the news file lacks
        assert day["clicks"] == day["clicks_in_pool"] + day["clicks_outside_pool"] + day["clicks_unknown"] > 0
        for k in (50, 100, 200):
            assert 0 <= day["exact"][f"recall@{k}"] <= 1 and 0 <= day["hnsw"][f"recall@{k}"] <= 1


def test_without_faiss_recall_is_exact_only_and_says_so(monkeypatch):
    import sys

    from speedyrec.eval.recall import recall_both

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    rng = np.random.default_rng(4)
    r = recall_both(rng.normal(size=(5, 8)), rng.normal(size=(300, 8)), [np.array([1, 2])] * 5)
    assert r["hnsw"] is None and "faiss" in r["note"] and r["exact"]["users"] == 5


def test_the_exported_news_encoder_loads_with_plain_transformers(tmp_path, cache_dir, synthetic_small, monkeypatch):
    """export writes the news encoder as a Hugging Face folder: transformers alone (AutoModel, AutoTokenizer, offline)
    and the folder's head module give every news the vector speedyrec exported for it (max abs difference <= 1e-5),
    the user head gives the user encoder's vectors, and model.encoder=<folder> trains again."""
    import importlib.util
    import sys

    import torch
    from transformers import AutoModel, AutoTokenizer

    from speedyrec.build import build_context, build_model
    from speedyrec.config import load_config
    from speedyrec.engine.checkpoint import read_part, step_dirs
    from speedyrec.engine.distributed import DistInfo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    argv = tiny_overrides(run, cache_dir, "data.format=synthetic", f"data.dir={synthetic_small}",
                          "data.title_tokens=16", "train.max_steps=3", "eval.max_impressions=60")
    assert train_main(argv) == 0
    assert export_main([str(run), "train.amp=off"]) == 0  # vectors in float32, as transformers computes them here
    folder = run / "export" / "news_encoder"
    assert json.loads((run / "export" / "export.json").read_text())["news_encoder"] == {"path": str(folder)}
    tokenizer, plm = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    assert plm.config.num_hidden_layers == 2
    spec = importlib.util.spec_from_file_location("speedyrec_head", folder / "speedyrec_head.py")
    head = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "speedyrec_head", head)
    spec.loader.exec_module(head)
    news_head, user_head = head.load_heads(folder)

    cfg = load_config(str(run / "config.yaml"), [f"out_dir={run}"])
    ctx = build_context(cfg, DistInfo())
    titles = ctx.data.news.text["title"]
    batch = tokenizer(titles, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        vectors = news_head(plm(**batch).last_hidden_state, batch["attention_mask"])
    exported = torch.from_numpy(np.load(run / "export" / "news_vectors.npy"))
    assert vectors.shape == exported.shape
    assert (vectors - exported).abs().max().item() <= 1e-5
    # the user head against speedyrec's user encoder, on histories with padding and an empty one
    model = build_model(cfg, ctx.parts, DistInfo())
    model.load_state_dict(read_part(step_dirs(run / "checkpoints")[0], "model")["model"])
    hist = exported[torch.randint(0, len(exported), (4, 7), generator=torch.Generator().manual_seed(0))]
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [False] * 7, [True] + [False] * 6])
    with torch.no_grad():
        assert (user_head(hist, mask) - model.user_encoder(hist, mask)).abs().max().item() <= 1e-5
    # and it is an encoder speedyrec trains again
    again = tmp_path / "again"
    assert train_main(tiny_overrides(again, cache_dir, "data.format=synthetic", f"data.dir={synthetic_small}",
                                     f"model.encoder={folder}", "data.title_tokens=16", "train.max_steps=2",
                                     "eval.max_impressions=20")) == 0
    assert json.loads((again / "metrics.json").read_text())["impressions"] == 20
