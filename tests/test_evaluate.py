"""Dev evaluation against a slow reference: each impression scored alone (its user vector from its last
max_history clicks, a dot product per candidate), metrics from scikit-learn; an ensemble is the mean score."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import tiny_overrides


def test_evaluate_models_and_their_mean_score_match_a_per_impression_reference(tmp_path, cache_dir, synthetic_small):
    from speedyrec.build import build_context, build_recommender
    from speedyrec.config import load_config
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.eval.evaluate import encode_news, evaluate_models
    from speedyrec.models.news_inputs import NewsInputs

    cfg = load_config(None, tiny_overrides(tmp_path / "o", cache_dir, "data.format=synthetic",
                                           f"data.dir={synthetic_small}", "model.dropout=0"))
    ctx = build_context(cfg, DistInfo())
    models = [build_recommender(ctx, 2, 0, seed).eval() for seed in (0, 1)]
    inputs, dev, h = NewsInputs(ctx.store), ctx.data.dev.take(np.arange(60)), 5  # short histories: truncation matters
    got = evaluate_models(models, inputs, dev, DistInfo(), max_history=h, batch_size=16, ensemble=[0, 1])
    assert len(got) == 3 and got[2]["members"] == 2

    with torch.no_grad():
        tables = [encode_news(m, inputs, np.arange(ctx.store.num_news), DistInfo(), 16, "off") for m in models]
        aucs = {0: [], 1: [], "mean": []}
        for i in range(len(dev)):
            labels = dev.labels[dev.candidates.offsets[i]:dev.candidates.offsets[i + 1]]
            if labels.min() == labels.max():
                continue  # AUC needs both a click and a non-click
            hist = dev.history.values[dev.history.offsets[i]:dev.history.offsets[i + 1]][-h:]
            cands = dev.candidates.values[dev.candidates.offsets[i]:dev.candidates.offsets[i + 1]]
            scores = []
            for m, table in zip(models, tables):
                hv = table[torch.as_tensor(hist, dtype=torch.long)][None]
                user = m.user_encoder(hv, torch.ones(hv.shape[:2], dtype=torch.bool))[0]
                scores.append((table[torch.as_tensor(cands, dtype=torch.long)] @ user).numpy())
            for k, s in ((0, scores[0]), (1, scores[1]), ("mean", (scores[0] + scores[1]) / 2)):
                aucs[k].append(roc_auc_score(labels, s))
    assert len(aucs[0]) > 20
    for k, result in ((0, got[0]), (1, got[1]), ("mean", got[2])):
        assert result["auc"] == pytest.approx(float(np.mean(aucs[k])), abs=1e-5), k
    assert got[2]["auc"] != pytest.approx(got[0]["auc"], abs=1e-4)  # the ensemble is not one of its members
