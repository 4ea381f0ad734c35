"""Teachers from the files of earlier stages: rebuilt on the base PLM, their weights verified by checksum."""
from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from speedyrec.build import Context, build_news_encoder, build_recommender, plm_layers
from speedyrec.distill.snapshots import SUFFIX, SnapshotError, load_snapshot
from speedyrec.models.checksum import weights_checksum


def model_files(directory: Path, what: str, stage: str) -> list[Path]:
    """``<name>_<k>.safetensors`` files of a stage's output folder, in order of k."""
    files = sorted(Path(directory).glob(f"*{SUFFIX}"), key=lambda p: _number(p.stem))
    if not files and (old := sorted(Path(directory).glob("*.pt"))):
        raise SnapshotError(f"{directory} holds {what} written by an older speedyrec as pickles ({old[0].name}, ...), "
                            "which this version does not open (opening a pickle can run any code it carries). If you "
                            f"trust their origin, convert them: python -m speedyrec.checkpoint convert {directory}")
    if not files:
        raise SnapshotError(f"no {what} in {directory}: run stage={stage} first (or set distill.from_dir to the "
                            f"out_dir of a run that did)")
    return files


def _number(stem: str) -> tuple:
    m = re.search(r"(\d+)$", stem)
    return (0, int(m.group(1)), stem) if m else (1, 0, stem)


def freeze(module: nn.Module) -> nn.Module:
    """A teacher that teaches: no parameter trains, dropout off."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def load_posttrained_encoder(ctx: Context, path: Path, freeze_layers: int) -> tuple[nn.Module, dict]:
    """A post-training snapshot as a news encoder whose first ``freeze_layers`` layers are frozen."""
    enc = build_news_encoder(ctx, 0, freeze_layers)
    snap = load_snapshot(enc, path, f"teacher {Path(path).stem}")
    return enc, snap


def load_posttrained_recommender(ctx: Context, path: Path | None, freeze_layers: int, seed: int, name: str):
    """A news recommender whose news encoder starts from the post-training snapshot at ``path`` (None: the plain
    PLM), user encoder initialised with ``seed``. Returns (model, snapshot or None)."""
    model = build_recommender(ctx, 0, freeze_layers, seed)
    snap = None if path is None else load_snapshot(model.news_encoder, path, f"teacher {name}")
    return model, snap


def load_finetuned_recommender(ctx: Context, path: Path, layers: int = 0) -> tuple[nn.Module, dict, str]:
    """A finetuned model file (teacher or student) as a frozen news recommender; returns (model, snapshot,
    checksum of its news encoder, which keys its teacher bank). Every layer is frozen, so M teachers stacked in a
    SharedPrefixStack run the layers they have in common (post-training left the PLM's bottom layers as they
    were) once for all M."""
    model = build_recommender(ctx, layers, layers or plm_layers(ctx), ctx.cfg.train.seed)
    snap = load_snapshot(model, path, f"model {Path(path).stem}")
    return freeze(model), snap, weights_checksum(model.news_encoder)
