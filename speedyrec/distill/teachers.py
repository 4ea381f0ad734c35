"""Teachers (and students) from the files of earlier stages: rebuilt on the base PLM, their weights verified by
checksum."""
from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from speedyrec.build import (Context, apply_buslm, build_news_encoder, build_recommender, buslm_encoder, news_encoding,
                             plm_layers)
from speedyrec.config import ConfigError
from speedyrec.distill.snapshots import (SUFFIX, SnapshotError, apply_delta, load_snapshot, read_snapshot,
                                         verify_checksum)
from speedyrec.models.checksum import news_checksum


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


def first_teachers(files: list[Path], m: int) -> list[Path]:
    """The first ``m`` of a stage's teacher files in snapshot order (``distill.teachers``; 0 = all): the ones a
    run that kept ``m`` post-training snapshots has, as snapshot k is taken at the same step whatever M is."""
    if m > len(files):
        raise SnapshotError(f"distill.teachers={m}, but {files[0].parent if files else 'the folder'} holds "
                            f"{len(files)} teachers")
    return files[:m] if m else files


def _number(stem: str) -> tuple:
    m = re.search(r"(\d+)$", stem)
    return (0, int(m.group(1)), stem) if m else (1, 0, stem)


def freeze(module: nn.Module) -> nn.Module:
    """A teacher that teaches: no parameter trains, dropout off."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def body_segments_of(snap: dict) -> int:
    """posttrain.body_segments of the run that wrote a post-training or Stage I snapshot (0 before it was recorded)."""
    return int(snap["meta"].get("body_segments", 0))


def load_title_body_snapshot(encoder: nn.Module, path: Path, what: str) -> tuple[dict, nn.Module]:
    """A post-training or Stage I snapshot loaded into the plain news encoder ``encoder``, its checksum verified.
    Returns (snapshot, the encoder that read bodies in its training): ``encoder``, or for a snapshot trained on bodies
    in BusLM segments (posttrain.body_segments) a BusLM encoder sharing ``encoder``'s parts and holding the
    snapshot's segment pooling."""
    snap = read_snapshot(path)
    body = buslm_encoder(encoder) if body_segments_of(snap) else encoder
    return load_snapshot(body, path, what, snap), body


def load_for_clicks(encoder: nn.Module, path: Path, what: str) -> dict:
    """A post-training or Stage I snapshot loaded into the plain news encoder ``encoder`` of a click stage, which reads
    news its own way: a segment pooling of post-training's body segments stays behind (BusLM's starts fresh, as it
    does after a plain snapshot). The snapshot returned names only tensors ``encoder`` holds."""
    snap, _ = load_title_body_snapshot(encoder, path, what)
    names = encoder.state_dict().keys()
    return {**snap, "delta": {k: t for k, t in snap["delta"].items() if k in names}}


def load_posttrained_encoder(ctx: Context, path: Path, freeze_layers: int) -> tuple[nn.Module, nn.Module, dict]:
    """A post-training snapshot as a news encoder whose first ``freeze_layers`` layers are frozen, and the encoder
    that reads bodies as it did (itself, or BusLM over the same parts: :func:`load_title_body_snapshot`). Stage I
    reads bodies as post-training did: a snapshot of another posttrain.body_segments is a ConfigError. Returns
    (encoder, body encoder, snapshot)."""
    enc = build_news_encoder(ctx, 0, freeze_layers)
    snap, body = load_title_body_snapshot(enc, path, f"teacher {Path(path).stem}")
    saved, now = body_segments_of(snap), ctx.cfg.posttrain.body_segments
    if saved != now:
        raise ConfigError(f"{path} was post-trained on bodies read with posttrain.body_segments={saved}; this run "
                          f"reads them with posttrain.body_segments={now}. Stage I's teachers and student read bodies "
                          "alike (the teachers' body bank is built from them): set it as the post-training run did, "
                          "or post-train the teachers again")
    return enc, body, snap


def load_posttrained_recommender(ctx: Context, path: Path | None, freeze_layers: int, seed: int, name: str):
    """A news recommender whose news encoder starts from the post-training snapshot at ``path`` (None: the plain
    PLM), user encoder initialised with ``seed``, reading news as the click stages do (BusLM's segments and refined
    text where the config asks: the snapshot's transformer, pooling and projection are BusLM's, its segment pooling
    and the frequency embedding start fresh). Returns (model, snapshot or None)."""
    model = build_recommender(ctx, 0, freeze_layers, seed)
    snap = None if path is None else load_for_clicks(model.news_encoder, path, f"teacher {name}")
    return apply_buslm(model, ctx.cfg), snap


def encoding_in_words(encoding: dict) -> str:
    segments, topk = encoding.get("segments"), encoding.get("refine_topk", 0)
    buslm = f"engine.buslm=true, engine.segments={segments}" if segments else "engine.buslm=false"
    return f"{buslm}, " + (f"engine.refine=true, engine.refine_topk={topk}" if topk else "engine.refine=false")


def load_finetuned_recommender(ctx: Context, path: Path, layers: int = 0) -> tuple[nn.Module, dict, str]:
    """A finetuned model file (teacher or student) as a frozen news recommender; returns (model, snapshot,
    checksum of what its news vectors depend on, which keys its teacher bank). Every parameter is frozen; the
    layers it trained stay above ``freeze_layers`` (the frequency embedding of refined text joins there, as in its
    training: the file's ``frozen_layers``), and the layers below, frozen then too, are what M teachers stacked in a
    SharedPrefixStack run once for all M where they have them in common (post-training left the PLM's bottom layers
    as they were). The file must have been trained on news read as this run reads them (BusLM, refined text): a
    ConfigError otherwise."""
    snap = read_snapshot(path)
    meta = snap["meta"]
    # files written before model files recorded it read one concatenated sequence of raw text
    saved = meta.get("news_encoding", {"segments": None, "refine_topk": 0})
    now = news_encoding(ctx.cfg)
    if saved != now:
        raise ConfigError(f"{path} was trained on news read with {encoding_in_words(saved)}; this run reads them "
                          f"with {encoding_in_words(now)}. A teacher and the student it teaches see the same input "
                          "(and the teacher bank is built from it): set these keys as the teachers' run did, or "
                          "finetune the teachers again with this run's")
    depth = layers or plm_layers(ctx)
    # files written before it was recorded read raw text: where their frozen part ends changes no vector
    frozen = min(int(meta.get("frozen_layers", depth)), depth)
    model = apply_buslm(build_recommender(ctx, layers, frozen, ctx.cfg.train.seed), ctx.cfg)
    apply_delta(model, snap, path)
    verify_checksum(model, snap, path, f"model {Path(path).stem}")
    return freeze(model), snap, news_checksum(model)


def build_student(ctx: Context, freeze_layers: int, start: Path | None) -> tuple[nn.Module, set[str], str]:
    """The student recommender (distill.student_layers of the PLM, the first ``freeze_layers`` frozen), the state
    names that differ from the PLM, and the checksum of what it starts from: the Stage I student at ``start``, or
    the PLM (None: "plm"). Stage II's student, and the pipeline's student without Stage II (pipeline.stage2=false)."""
    cfg = ctx.cfg
    student = build_recommender(ctx, cfg.distill.student_layers, freeze_layers, cfg.train.seed)
    changed, checksum = set(), "plm"
    if start is not None:
        snap = load_for_clicks(student.news_encoder, start, "the Stage I student")
        changed, checksum = {f"news_encoder.{k}" for k in snap["delta"]}, snap["checksum"]
    # Stage I trained a plain news encoder on titles and bodies: BusLM reads clicks' news with its transformer,
    # token pooling and projection
    return apply_buslm(student, cfg), changed, checksum
