"""Vectors and predictions from a trained run: ``python -m speedyrec.export RUN_DIR [--out DIR] [key=value ...]``.

Reads ``RUN_DIR/config.yaml`` and the newest checkpoint (``RUN_DIR/checkpoints/step_N/``, or ``--checkpoint``),
with ``key=value`` overrides on top (e.g. ``data.dir=`` another copy of the data in the same format). Writes to
``--out`` (default ``RUN_DIR/export``):

- ``news_vectors.npy`` [N, D] float32 and ``news_ids.txt``: every news of the news file, encoded in length-sorted
  batches (news of similar length together, so almost no padding is computed);
- ``user_vectors.npy`` [I, D] and ``impressions.txt``: one user vector per dev impression (the user encoder over
  the vectors of the last ``data.max_history`` clicked news), with the impression's position (1-based) and user;
- ``prediction.txt``: MIND's leaderboard format, ``position [r1,r2,...]``, each candidate's rank by score
  (1 = first) in the order the behaviors file lists the known candidates;
- ``export.json``: counts and the dev metrics recomputed from the written vectors, which equal those of
  evaluation;
- ``news_encoder/``: the trained news encoder as a Hugging Face model folder with its tokenizer, heads and a
  small module that applies them (``speedyrec.hf_export``): ``AutoModel.from_pretrained`` loads it without
  speedyrec, and ``model.encoder=<it>`` trains it again. Skipped, and said in export.json, for a model a plain
  transformer cannot reproduce (BusLM, refined text, a custom encoder).

Candidates whose news id is not in the news file cannot be scored: the data layer drops and counts them
(``unknown_news_ids``, also in ``export.json``): a prediction file for MIND's leaderboard needs the news file
that covers every candidate.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from speedyrec.config import ConfigError, load_config
from speedyrec.data.faults import DataError
from speedyrec.engine.checkpoint import CheckpointError

log = logging.getLogger("speedyrec")


def export(run_dir: Path, out: Path | None = None, checkpoint: Path | None = None, overrides: list[str] | None = None,
           batch_size: int = 256, daily_recall: Path | None = None) -> dict:
    from speedyrec.build import build_context, build_model, segments_of
    from speedyrec.engine.checkpoint import is_old_format, old_format_error, read_part, step_dirs
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.eval.evaluate import encode_news, user_vectors
    from speedyrec.eval.metrics import impression_metrics, metric_sums, metrics_from_sums
    from speedyrec.models.backbone import eval_mode
    from speedyrec.models.news_inputs import NewsInputs

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: give the out_dir of a finished speedyrec.train run")
    out = Path(out) if out else run_dir / "export"
    cfg = load_config(str(run_dir / "config.yaml"), [*(overrides or []), f"out_dir={out}"])
    if cfg.stage != "finetune":
        raise ConfigError(f"{run_dir} is a stage={cfg.stage} run; export reads finetune runs (a model trained on clicks)")
    if checkpoint:
        ckpt_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    else:
        newest = step_dirs(run_dir / "checkpoints")
        ckpt_dir = newest[0] if newest else run_dir / "checkpoints" / "step_N"
    if is_old_format(ckpt_dir):
        raise old_format_error(ckpt_dir)
    if not (ckpt_dir / "model.safetensors").is_file():
        raise ConfigError(f"no checkpoint in {ckpt_dir}: pass --checkpoint, or train with the default checkpointing")
    dist = DistInfo()
    ctx = build_context(cfg, dist)
    model = build_model(cfg, ctx.parts, dist)
    state = read_part(ckpt_dir, "model")
    model.load_state_dict(state["model"])
    inputs = NewsInputs(ctx.store, segments_of(cfg))
    amp = cfg.train.amp
    with torch.no_grad(), eval_mode(model):
        all_news = np.arange(ctx.store.num_news, dtype=np.int64)
        news = encode_news(model, inputs, all_news, dist, batch_size, amp)  # [N, D]
        dev = ctx.data.dev
        if cfg.eval.max_impressions:
            dev = dev.take(np.arange(min(cfg.eval.max_impressions, len(dev))))
        hist = dev.history.padded(cfg.data.max_history, fill=-1, keep="last")
        users = user_vectors(model.user_encoder, news, hist, dist.device, amp)  # [I, D]
    news_np, users_np = news.numpy(), users.numpy()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "news_vectors.npy", news_np)
    (out / "news_ids.txt").write_text("".join(f"{i}\n" for i in ctx.data.news.ids))
    np.save(out / "user_vectors.npy", users_np)
    (out / "impressions.txt").write_text("".join(f"{k + 1}\t{dev.users[u]}\n" for k, u in enumerate(dev.user)))

    # scores from the written vectors alone: the round trip that shows they are the evaluated ones
    cand, labels = dev.candidates, dev.labels
    scores = np.einsum("cd,cd->c", news_np[cand.values.astype(np.int64)], users_np[cand.row_ids()])
    lines = []
    for k in range(len(dev)):
        s = scores[cand.offsets[k]:cand.offsets[k + 1]]
        rank = np.empty(len(s), dtype=np.int64)
        rank[np.argsort(-s, kind="stable")] = np.arange(1, len(s) + 1)
        lines.append(f"{k + 1} [{','.join(map(str, rank.tolist()))}]\n")
    (out / "prediction.txt").write_text("".join(lines))
    metrics = metrics_from_sums(metric_sums(impression_metrics(scores, labels, cand.offsets)))
    summary = {"run_dir": str(run_dir), "checkpoint": str(ckpt_dir), "step": state.get("step"),
               "news": int(len(news_np)), "dim": int(news_np.shape[1]), "impressions": int(len(dev)),
               "unknown_news_ids": ctx.data.faults.as_dict().get("unknown_news_ids"), "dev_metrics": metrics}
    # Recall@K: every dev impression's user retrieves from all news, its history left out; and, when given, the
    # daily pools of the SpeedyRec example data (daily_news_X.tsv, history_positive_X.tsv)
    from speedyrec.eval.recall import recall_both

    positives = [cand.values[cand.offsets[k]:cand.offsets[k + 1]][labels[cand.offsets[k]:cand.offsets[k + 1]] > 0]
                 for k in range(len(dev))]
    summary["recall_dev"] = recall_both(users_np, news_np, positives, [h[h >= 0] for h in hist])
    if daily_recall is not None:
        with torch.no_grad(), eval_mode(model):
            summary["recall_daily"] = recall_daily(Path(daily_recall), model, news, ctx.data.news, cfg.data.max_history,
                                                   dist.device, amp)
    from speedyrec.hf_export import export_news_encoder

    summary["news_encoder"] = export_news_encoder(cfg, model, ctx.parts.tokenizer, out / "news_encoder",
                                                  {"run_dir": str(run_dir), "checkpoint": str(ckpt_dir)})
    (out / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary



def _ids(field: str) -> list[str]:
    return [x for x in field.strip().split(";") if x]


def recall_daily(directory: Path, model, news: torch.Tensor, table, max_history: int, device, amp: str) -> dict:
    """Recall@K on each day X of ``directory``: the pool is ``daily_news_X.tsv`` (tab-separated ids), the users
    and their next clicks ``history_positive_X.tsv`` (``user \\t history(;) \\t clicked(;)``). Ids missing from the
    news file are counted and left out; a click outside the day's pool cannot be retrieved and is counted."""
    from speedyrec.eval.evaluate import user_vectors
    from speedyrec.eval.recall import recall_both

    days = sorted(directory.glob("daily_news_*.tsv"))
    if not days:
        raise DataError(f"{directory}: no daily_news_*.tsv files")
    out = {}
    for pool_file in days:
        day = pool_file.stem.removeprefix("daily_news_")
        users_file = directory / f"history_positive_{day}.tsv"
        if not users_file.is_file():
            raise DataError(f"{pool_file} has no matching {users_file.name}")
        pool_ids = [x for x in pool_file.read_text().split() if x]
        looked = table.lookup(pool_ids)
        pool_idx = np.unique(looked[looked >= 0])  # a pool lists a news once; repeats are not new candidates
        where = {int(n): i for i, n in enumerate(pool_idx)}
        counts = {"pool_ids": len(pool_ids), "pool_unknown": int((looked < 0).sum()),
                  "pool_news": len(pool_idx), "clicks": 0,
                  "clicks_in_pool": 0, "clicks_unknown": 0, "clicks_outside_pool": 0, "history_unknown": 0}
        hist_rows, positives, excluded = [], [], []
        for line in users_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            h = table.lookup(_ids(parts[1]))
            counts["history_unknown"] += int((h < 0).sum())
            h = h[h >= 0][-max_history:]
            c = table.lookup(_ids(parts[2]))
            counts["clicks"] += len(c)
            counts["clicks_unknown"] += int((c < 0).sum())
            in_pool = [where[int(n)] for n in c if n >= 0 and int(n) in where]
            counts["clicks_in_pool"] += len(in_pool)
            counts["clicks_outside_pool"] += int(((c >= 0).sum()) - len(in_pool))
            hist_rows.append(np.pad(h, (max_history - len(h), 0), constant_values=-1))
            positives.append(np.asarray(in_pool, dtype=np.int64))
            excluded.append(np.asarray([where[int(n)] for n in h if int(n) in where], dtype=np.int64))
        users = user_vectors(model.user_encoder, news, np.stack(hist_rows), device, amp).numpy()
        out[day] = {**counts, "users": len(hist_rows), **recall_both(users, news.numpy()[pool_idx], positives, excluded)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="speedyrec.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="out_dir of a finished speedyrec.train run")
    ap.add_argument("overrides", nargs="*", help="key=value settings on top of the run's config")
    ap.add_argument("--out", default="", help="where to write (default RUN_DIR/export)")
    ap.add_argument("--checkpoint", default="", help="a checkpoint (default the newest RUN_DIR/checkpoints/step_N)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--daily-recall", default="", help="a folder of daily_news_X.tsv / history_positive_X.tsv pools")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        s = export(Path(a.run_dir), Path(a.out) if a.out else None, Path(a.checkpoint) if a.checkpoint else None,
                   a.overrides, a.batch_size, Path(a.daily_recall) if a.daily_recall else None)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"speedyrec.export: {e}", file=sys.stderr)
        return 2
    m = s["dev_metrics"]
    print(f"exported {s['news']} news and {s['impressions']} user vectors (dim {s['dim']}) to "
          f"{a.out or Path(a.run_dir) / 'export'}; dev AUC from them {m.get('auc', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
