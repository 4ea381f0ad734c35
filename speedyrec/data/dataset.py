"""Find, read and split a data directory into the news table and train/dev impression logs."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speedyrec.data.behaviors import Behaviors, read_mind_behaviors, read_speedyrec_test, read_speedyrec_train
from speedyrec.data.faults import DataError, FaultLog
from speedyrec.data.news import NewsTable, read_bodies, read_doc_features, read_mind_news
from speedyrec.data.parse_cache import cached_read

log = logging.getLogger("speedyrec.data")

TRAIN_DIRS = ("train", "MINDsmall_train", "MINDlarge_train", "MINDdemo_train")
DEV_DIRS = ("dev", "valid", "MINDsmall_dev", "MINDlarge_dev", "MINDdemo_dev")
TEST_DIRS = ("test", "MINDsmall_test", "MINDlarge_test", "MINDdemo_test")


@dataclass
class Dataset:
    news: NewsTable
    train: Behaviors
    dev: Behaviors
    faults: FaultLog
    root: Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPEEDYREC_CACHE") or Path.home() / ".cache" / "speedyrec")


def cache_dir_of(data_cfg) -> Path:
    return Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()


def synthetic_dir(data_cfg) -> Path:
    """Where the embedded default lives: ``data.dir`` if given, else a folder in the cache named by its settings."""
    if data_cfg.dir:
        return Path(data_cfg.dir)
    name = (f"u{data_cfg.synthetic_users}-s{data_cfg.synthetic_seed}"
            f"-h{data_cfg.synthetic_head_share:g}-f{data_cfg.synthetic_head_fraction:g}"
            + (f"-m{data_cfg.synthetic_history_mean:g}" if data_cfg.synthetic_history_mean else ""))
    return cache_dir_of(data_cfg) / "synthetic" / name


def ensure_synthetic(data_cfg) -> Path:
    """Generate the synthetic data set unless it is complete already. Call on one process only."""
    out = synthetic_dir(data_cfg)
    if not (out / "COMPLETE").exists():
        from speedyrec.data.synthetic import generate

        log.info("generating the synthetic data set (%d users) into %s", data_cfg.synthetic_users, out)
        generate(out, users=data_cfg.synthetic_users, seed=data_cfg.synthetic_seed,
                 head_share=data_cfg.synthetic_head_share, head_fraction=data_cfg.synthetic_head_fraction,
                 history_mean=data_cfg.synthetic_history_mean)
    return out


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what}: expected the file {path}")
    return path


def split_by_time(beh: Behaviors, dev_fraction: float) -> tuple[Behaviors, Behaviors]:
    """The last ``dev_fraction`` of impressions by time become dev (rows are already time-sorted)."""
    n = len(beh)
    n_dev = int(round(n * dev_fraction))
    order = np.argsort(beh.time, kind="stable")
    return beh.take(order[: n - n_dev]), beh.take(order[n - n_dev :])


def _mind_behaviors(paths: list[Path], news: NewsTable, faults: FaultLog, cfg, listing: bool = False,
                    labels_optional: bool = False) -> Behaviors:
    """A MIND behaviors file, parsed once per content and news table (speedyrec.data.parse_cache)."""
    settings = {"reader": "mind", "listing": listing, "labels_optional": labels_optional,
                "max_line_bytes": cfg.max_line_bytes}
    return cached_read(lambda p, n, f, spool: read_mind_behaviors(p, n, f, cfg.max_line_bytes, listing, labels_optional,
                                                                  spool),
                       paths, news, faults, cache_dir_of(cfg), settings)


def _read_mind_layout(root: Path, cfg, faults: FaultLog) -> tuple[NewsTable, Behaviors, Behaviors]:
    news = NewsTable()
    mlb = cfg.max_line_bytes
    if (root / "behaviors.tsv").is_file():
        read_mind_news(_require(root / "news.tsv", f"data.dir={root}"), news, faults, mlb)
        if (root / "bodies.tsv").is_file():
            read_bodies(root / "bodies.tsv", news, faults, mlb)
        beh = _mind_behaviors([root / "behaviors.tsv"], news, faults, cfg, listing=True)
        train, dev = split_by_time(beh, cfg.dev_fraction)
        train.listing = None  # only dev is answered line by line
        return news, train, dev
    train_dir, dev_dir = _first_dir(root, TRAIN_DIRS), _first_dir(root, DEV_DIRS)
    if train_dir is None:
        raise DataError(f"data.dir={root}: expected news.tsv + behaviors.tsv, or a train/ folder "
                        f"(one of {', '.join(TRAIN_DIRS)}) with an optional dev/ folder ({', '.join(DEV_DIRS)})")
    split_dirs = [train_dir] + ([dev_dir] if dev_dir else [])
    for d in split_dirs:
        read_mind_news(_require(d / "news.tsv", f"data.dir={root}"), news, faults, mlb)
    for d in split_dirs:
        if (d / "bodies.tsv").is_file():
            read_bodies(d / "bodies.tsv", news, faults, mlb)
    train = _mind_behaviors([_require(train_dir / "behaviors.tsv", f"data.dir={root}")], news, faults, cfg)
    if dev_dir is not None:
        dev = _mind_behaviors([_require(dev_dir / "behaviors.tsv", f"data.dir={root}")], news, faults, cfg,
                              listing=True)
    else:
        train, dev = split_by_time(train, cfg.dev_fraction)
    return news, train, dev


def read_test_split(ds: Dataset, cfg) -> tuple[Behaviors, Path]:
    """The test split of a MIND-layout ``data.dir`` (``test/``, ``MINDlarge_test/``, ...: its own news.tsv and
    behaviors.tsv, candidates with or without labels), in file order with its listing. Its news file's new ids
    are appended to ``ds.news`` (the indices of the news already read do not change). Faults are counted in
    ``ds.faults``. Returns (impressions, the split's folder)."""
    if cfg.format == "speedyrec":
        raise DataError("data.format=speedyrec has no test split to predict: its testdata/ impressions are the dev "
                        "set (export without --split test)")
    test_dir = _first_dir(ds.root, TEST_DIRS)
    if test_dir is None:
        raise DataError(f"data.dir={ds.root} has no test split: expected one of the folders {', '.join(TEST_DIRS)} "
                        "with news.tsv and behaviors.tsv (MIND-large's is MINDlarge_test)")
    read_mind_news(_require(test_dir / "news.tsv", f"test split {test_dir}"), ds.news, ds.faults, cfg.max_line_bytes)
    if (test_dir / "bodies.tsv").is_file():
        read_bodies(test_dir / "bodies.tsv", ds.news, ds.faults, cfg.max_line_bytes)
    beh = _mind_behaviors([_require(test_dir / "behaviors.tsv", f"test split {test_dir}")], ds.news, ds.faults, cfg,
                          listing=True, labels_optional=True)
    return beh.in_file_order(), test_dir


def _read_speedyrec_layout(root: Path, cfg, faults: FaultLog) -> tuple[NewsTable, Behaviors, Behaviors]:
    news = NewsTable()
    mlb = cfg.max_line_bytes
    train_dir, test_dir = root / "traindata", root / "testdata"
    if not train_dir.is_dir():
        raise DataError(f"data.dir={root} (data.format=speedyrec): expected traindata/ with DocFeatures.tsv and "
                        "ProtoBuf_*.tsv, and optionally testdata/ with DocFeatures.tsv and impressions/ProtoBuf_*.tsv")
    for d in (train_dir, test_dir):
        if (d / "DocFeatures.tsv").is_file():
            read_doc_features(d / "DocFeatures.tsv", news, faults, mlb)
    if len(news) == 0:
        raise DataError(f"data.dir={root}: no news read; expected {train_dir / 'DocFeatures.tsv'}")
    train_files = sorted(train_dir.glob("ProtoBuf_*.tsv"), key=_shard_number)
    if not train_files:
        raise DataError(f"data.dir={root}: no training logs {train_dir}/ProtoBuf_*.tsv")
    train = read_speedyrec_train(train_files, news, faults, mlb, history_cap=max(cfg.max_history, 1))
    test_files = sorted((test_dir / "impressions").glob("ProtoBuf_*.tsv"), key=_shard_number)
    if test_files:
        dev = read_speedyrec_test(test_files, news, faults, mlb)
    else:
        train, dev = split_by_time(train, cfg.dev_fraction)
    return news, train, dev


def _shard_number(p: Path) -> tuple:
    stem = p.stem.rsplit("_", 1)[-1]
    return (int(stem), "") if stem.isdigit() else (1 << 30, p.name)


def load_dataset(cfg, root: Path | None = None) -> Dataset:
    """Read the data set described by the ``data`` config section (the synthetic one must exist already)."""
    faults = FaultLog(strict=cfg.strict)
    if root is None:
        root = synthetic_dir(cfg) if cfg.format == "synthetic" else Path(cfg.dir)
    if not cfg.dir and cfg.format != "synthetic":
        raise DataError(f"data.format={cfg.format} needs data.dir")
    if not root.is_dir():
        raise DataError(f"data.dir={root} is not a directory")
    if cfg.format == "speedyrec":
        news, train, dev = _read_speedyrec_layout(root, cfg, faults)
    else:
        news, train, dev = _read_mind_layout(root, cfg, faults)
    if len(news) == 0:
        raise DataError(f"data.dir={root}: the news table is empty")
    faults.counts["clicks_unknown_news"] = int(train.unknown_clicks.sum())
    if len(train) == 0:
        raise DataError(f"data.dir={root}: no training impressions could be read ({faults.summary() or 'no rows'})")
    return Dataset(news, train, dev, faults, root)
