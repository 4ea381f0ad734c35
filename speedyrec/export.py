"""Vectors and predictions from a trained run: ``python -m speedyrec.export RUN_DIR [--split dev|test] [--out DIR]
[key=value ...]``, or ``torchrun --nproc_per_node=N -m speedyrec.export ...``: every rank encodes a share of the news on
its device, rank 0 writes.

Reads ``RUN_DIR/config.yaml`` and the newest checkpoint (``RUN_DIR/checkpoints/step_N/``, or ``--checkpoint``),
with ``key=value`` overrides on top (e.g. ``data.dir=`` another copy of the data in the same format). Writes to
``--out`` (default ``RUN_DIR/export``):

- ``news_vectors.npy`` [N, D] float32 and ``news_ids.txt``: every news of the news file, encoded in length-sorted
  batches (news of similar length together, so almost no padding is computed);
- ``user_vectors.npy`` [I, D] and ``impressions.txt`` (``<impression id> \\t <user>``): one user vector per
  impression (the user encoder over the vectors of the last ``data.max_history`` clicked news), in the order the
  behaviors file lists the impressions;
- ``prediction.txt`` and ``prediction.zip``: MIND's leaderboard format, ``<impression id> [r1,r2,...]``, one line per
  impression in the file's order, the rank (1 = first) of every candidate the line lists, in its order. A
  candidate whose news id the news file lacks has no vector: it ranks after every scored candidate of its
  impression (counted as ``candidates_unknown_news``);
- ``truth.txt`` (labelled impressions only): ``<impression id> [labels]``, the file's labels in the same layout, so
  that dev can be scored exactly as the leaderboard scores a submission;
- ``export.json``: counts; ``dev_metrics`` recomputed from the written vectors over the known candidates, which
  equal those of evaluation, and ``leaderboard_metrics``, prediction.txt scored against truth.txt over every
  listed candidate (score = 1 / rank);
- ``news_encoder/``: the trained news encoder as a Hugging Face model folder with its tokenizer, heads and a
  small module that applies them (``speedyrec.hf_export``): ``AutoModel.from_pretrained`` loads it without
  speedyrec, and ``model.encoder=<it>`` trains it again. Skipped, and said in export.json, for a model a plain
  transformer cannot reproduce (BusLM, refined text, a custom encoder).

``--split dev`` (the default) predicts the run's dev impressions (the ones it evaluated: ``eval.max_impressions``
of them by time when set). ``--split test`` predicts MIND's test split under ``data.dir`` (``test/``,
``MINDlarge_test/``, ...: its own news.tsv and behaviors.tsv, whose candidates carry no labels); its news file's
new news are tokenized with the run's tokenizer and encoded with the rest.
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
from speedyrec.data.behaviors import Listing
from speedyrec.data.faults import DataError
from speedyrec.engine.checkpoint import CheckpointError

log = logging.getLogger("speedyrec")


def export(run_dir: Path, out: Path | None = None, checkpoint: Path | None = None, overrides: list[str] | None = None,
           batch_size: int = 256, daily_recall: Path | None = None, split: str = "dev") -> dict:
    from speedyrec.build import build_context, build_model, build_token_store, segments_of
    from speedyrec.data.dataset import read_test_split
    from speedyrec.engine.checkpoint import is_old_format, old_format_error, read_part, step_dirs
    from speedyrec.engine.distributed import init_distributed
    from speedyrec.eval.evaluate import encode_news, user_vectors
    from speedyrec.eval.metrics import impression_metrics, metric_sums, metrics_from_sums
    from speedyrec.models.backbone import eval_mode
    from speedyrec.models.news_inputs import NewsInputs

    if split not in SPLITS:
        raise ConfigError(f"--split {split}: expected one of {', '.join(SPLITS)}")
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
    dist = init_distributed()  # one process, or every rank of a torchrun launch: each encodes a share of the news
    ctx = build_context(cfg, dist)  # the run's news, tokenizer and token store, as it trained
    model = build_model(cfg, ctx.parts, dist)
    state = read_part(ckpt_dir, "model")
    model.load_state_dict(state["model"])
    store, known_news = ctx.store, len(ctx.data.news)
    if split == "test":
        # the test split's news file adds its new news after the run's (no index moves, the tokenizer and the
        # refinement's IDF stay the run's); they are tokenized like every other news
        imps, split_dir = read_test_split(ctx.data, cfg.data)
        if len(ctx.data.news) > known_news:
            store = build_token_store(cfg, ctx.data, ctx.parts.tokenizer, dist)
        if dist.is_main:
            ctx.data.faults.warn()
    else:
        imps, split_dir = ctx.data.dev, None
        if cfg.eval.max_impressions:  # the impressions the run evaluated: the first ones by time
            imps = imps.take(np.arange(min(cfg.eval.max_impressions, len(imps))))
        imps = imps.in_file_order()
    inputs = NewsInputs(store, segments_of(cfg))
    amp = cfg.train.amp
    with torch.no_grad(), eval_mode(model):
        all_news = np.arange(store.num_news, dtype=np.int64)
        news = encode_news(model, inputs, all_news, dist, batch_size, amp)  # [N, D]
        hist = imps.history.padded(cfg.data.max_history, fill=-1, keep="last")
        users = user_vectors(model.user_encoder, news, hist, dist.device, amp)  # [I, D]
    news_np, users_np = news.cpu().numpy(), users.cpu().numpy()
    if not dist.is_main:  # its share of the news is encoded and gathered; rank 0 writes everything
        return {}
    listing = listing_of(imps)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "news_vectors.npy", news_np)
    (out / "news_ids.txt").write_text("".join(f"{i}\n" for i in ctx.data.news.ids))
    np.save(out / "user_vectors.npy", users_np)
    (out / "impressions.txt").write_text("".join(f"{i}\t{imps.users[u]}\n" for i, u in zip(listing.ids, imps.user)))

    # scores from the written vectors alone: the round trip that shows they are the evaluated ones
    cand, labels = imps.candidates, imps.labels
    scores = np.einsum("cd,cd->c", news_np[cand.values.astype(np.int64)], users_np[cand.row_ids()])
    ranks, unknown = listed_ranks(listing, cand.offsets, scores)
    write_prediction(out, listing, ranks)
    summary = {"run_dir": str(run_dir), "checkpoint": str(ckpt_dir), "step": state.get("step"), "split": split,
               "split_dir": str(split_dir) if split_dir else None, "news": int(len(news_np)),
               "news_added_by_split": int(len(news_np) - known_news), "dim": int(news_np.shape[1]),
               "impressions": int(len(imps)), "candidates_listed": int(len(listing.slots.values)),
               "candidates_unknown_news": unknown, "unknown_news_ids": ctx.data.faults.as_dict().get("unknown_news_ids"),
               "duplicate_impression_ids": int(len(listing.ids) - len(set(listing.ids.tolist()))),
               "impression_ids": "the file's" if imps.listing is not None else "positions (the log names none)",
               "labelled": imps.labelled()}
    if imps.labelled():
        # the known candidates' metrics equal evaluation's; the leaderboard's count every listed candidate,
        # scored 1 / rank as it scores prediction.txt against truth.txt
        summary["dev_metrics"] = metrics_from_sums(metric_sums(impression_metrics(scores, labels, cand.offsets)))
        summary["leaderboard_metrics"] = metrics_from_sums(metric_sums(impression_metrics(
            1.0 / ranks, listing.slots.values, listing.slots.offsets)))
        (out / "truth.txt").write_text("".join(f"{i} [{','.join(map(str, listing.slots.row(k).tolist()))}]\n"
                                               for k, i in enumerate(listing.ids)))
        # Recall@K: every impression's user retrieves from all news, its history left out; and, when given, the
        # daily pools of the SpeedyRec example data (daily_news_X.tsv, history_positive_X.tsv)
        from speedyrec.eval.recall import recall_both

        positives = [cand.row(k)[labels[cand.offsets[k]:cand.offsets[k + 1]] > 0] for k in range(len(imps))]
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


SPLITS = ("dev", "test")


def listing_of(imps) -> Listing:
    """The impressions' listing; for a log that keeps none (a dev set cut from a training log without impression
    ids), one that names each impression by its position (1-based) and lists its known candidates."""
    from speedyrec.data.ragged import Ragged

    if imps.listing is not None:
        return imps.listing
    cand = imps.candidates
    within = np.arange(len(cand.values), dtype=np.int64) - np.repeat(cand.offsets[:-1], cand.lengths())
    return Listing(np.asarray([str(k + 1) for k in range(len(imps))], dtype=str), np.arange(len(imps)),
                   Ragged(cand.offsets.copy(), imps.labels.copy()), within.astype(np.int32))


def listed_ranks(listing, candidate_offsets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, int]:
    """The rank (1 = first) of every listed candidate, aligned with ``listing.slots.values``, from the scores of
    the known candidates (aligned with the candidates whose offsets are given). A candidate the news file lacks
    has no score: it ranks after every scored one of its impression, in the order listed; the pieces of a glued
    token rank as their best. Ties keep the listed order. Returns (ranks, how many listed candidates had no
    score)."""
    slots = listing.slots
    rows = slots.row_ids()
    slot_score = np.full(len(slots.values), -np.inf)
    where = np.repeat(slots.offsets[:-1], np.diff(candidate_offsets)) + listing.candidate_slot
    np.maximum.at(slot_score, where, scores.astype(np.float64))
    scored = np.zeros(len(slots.values), dtype=bool)
    scored[where] = True
    order = np.lexsort((-slot_score, rows))  # by impression, then best first; lexsort is stable: ties as listed
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order)) - np.repeat(slots.offsets[:-1], slots.lengths()) + 1
    return ranks, int((~scored).sum())


def write_prediction(out: Path, listing, ranks: np.ndarray) -> None:
    """``prediction.txt`` (``<impression id> [r1,r2,...]``, one line per impression in the file's order, a rank for
    every listed candidate) and ``prediction.zip`` holding it, as MIND's leaderboard takes a submission."""
    import zipfile

    slots = listing.slots
    text = "".join(f"{i} [{','.join(map(str, ranks[slots.offsets[k]:slots.offsets[k + 1]].tolist()))}]\n"
                   for k, i in enumerate(listing.ids))
    (out / "prediction.txt").write_text(text)
    with zipfile.ZipFile(out / "prediction.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("prediction.txt", text)


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
    ap.add_argument("--split", default="dev", choices=SPLITS, help="the impressions to predict: dev (the run's "
                    "evaluation set, with truth.txt) or test (MIND's test split under data.dir, labels not needed)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from speedyrec.engine.distributed import shutdown

    try:
        s = export(Path(a.run_dir), Path(a.out) if a.out else None, Path(a.checkpoint) if a.checkpoint else None,
                   a.overrides, a.batch_size, Path(a.daily_recall) if a.daily_recall else None, a.split)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"speedyrec.export: {e}", file=sys.stderr)
        shutdown(wait_for_others=False)
        return 2
    shutdown()
    if not s:  # not rank 0
        return 0
    where = a.out or Path(a.run_dir) / "export"
    print(f"exported {s['news']} news and {s['impressions']} {a.split} user vectors (dim {s['dim']}) and "
          f"{where}/prediction.zip ({s['candidates_listed']} candidates ranked, {s['candidates_unknown_news']} of them "
          "not in the news file, ranked last)" + (f"; dev AUC from the vectors {s['dev_metrics'].get('auc', float('nan')):.4f}"
                                                  if "dev_metrics" in s else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
