"""Mid-stage checkpoints and exact resumption, shared by every stage that trains on clicks with the engine.

A checkpoint (``engine.checkpoint``) holds the model and optimizer, every rank's progress (RNG states, loader
position, counters), the workflow's embedding cache, the dev curve so far and the identity of what the stage
learns from (the teachers' checksums, which also key the teacher bank): it continues only the run it came from.
``train.resume=auto`` (or a torchrun restart) continues from the newest readable checkpoint of the stage.
"""
from __future__ import annotations

import logging
from pathlib import Path

from speedyrec.config import ConfigError, flat_config
from speedyrec.engine import checkpoint
from speedyrec.engine.trainer import Trainer, checkpoint_state, restore_state

log = logging.getLogger("speedyrec")

# settings that may change between a checkpoint and its resumption (how long, how often, where to report)
# data.cache_dir, engine.frozen_cache_dir: where content-keyed caches live, which may differ by node (node-local
# disks) and by launch
RESUMABLE_CHANGES = ("out_dir", "train.resume", "train.max_steps", "train.max_seconds", "train.epochs",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.checkpoint_errors", "train.log_every",
                     "train.heap_trim_every", "eval.", "data.cache_dir", "engine.frozen_cache_dir")


def differing_keys(saved: dict, now: dict, matters=lambda key, then, now: True) -> list[tuple[str, object, object]]:
    """(dotted key, value in ``saved``, value in ``now``) for each setting whose value differs between two config
    dicts (nested or already flat) and ``matters``, in key order."""
    a, b = flat_config(saved), flat_config(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and matters(k, a.get(k), b.get(k))]


def differing_settings(saved: dict, now: dict, matters=lambda key, then, now: True, then_word: str = "then",
                       now_word: str = "now") -> str:
    """The settings that differ between two config dicts and ``matters``, in words (the first five); empty when
    none do."""
    return "; ".join(f"{k}: {a!r} {then_word}, {b!r} {now_word}" for k, a, b in differing_keys(saved, now, matters)[:5])


def check_same_config(directory: Path, saved: dict, now: dict) -> None:
    """A checkpoint continues only the run it came from: any other setting that differs is an error."""
    shown = differing_settings(saved, now, lambda k, *_: not k.startswith(RESUMABLE_CHANGES), "in the checkpoint")
    if shown:
        raise ConfigError(f"checkpoint {directory} was written with other settings ({shown}): resume with the same "
                          "settings, or give this run another out_dir")


def restart_count() -> int:
    """How many times torchrun has restarted this job's group (--max-restarts); 0 on a first start. The same on
    every rank of every node: agreed when the group formed (engine.distributed.init_distributed)."""
    from speedyrec.engine import distributed

    return distributed.ATTEMPT


def elastic_restart() -> str:
    """``auto`` when torchrun restarted the group: continue from the last checkpoint instead of starting again."""
    return "auto" if restart_count() else ""


def resume_request(cfg) -> str:
    """What to resume from: train.resume, or ``auto`` after a torchrun restart; empty: start afresh."""
    return cfg.train.resume or elastic_restart()


class StageCheckpoints:
    """The checkpoints of one stage's training, in ``out/checkpoints/step_N``.

    ``identity``: what the stage learns from, by checksum; a checkpoint written for other teachers is refused.
    ``curve``: the stage's dev evaluations so far, saved and restored in place."""

    def __init__(self, cfg, dist, out: Path, workflow=None, identity: dict | None = None):
        self.cfg, self.dist, self.root = cfg, dist, out / "checkpoints"
        self.workflow, self.identity = workflow, identity or {}
        self.curve: list[dict] = []

    def trainer_kwargs(self) -> dict:
        return {"checkpoint_every": self.cfg.train.checkpoint_every, "checkpoint_fn": self.save}

    def save(self, trainer: Trainer) -> None:
        """A checkpoint of the trainer's state now (collective: every rank writes its own part)."""
        shared, own = checkpoint_state(trainer)
        shared.update(config=self.cfg.to_dict(), identity=self.identity, curve=self.curve)
        if hasattr(self.workflow, "state_dict"):
            own["workflow"] = self.workflow.state_dict()
            cache = own["workflow"].get("cache")
            if cache is not None and not cache["sharded"]:  # a replica, the same rows on every rank: saved once
                shared["workflow_cache"] = own["workflow"].pop("cache")
        try:
            checkpoint.save(self.root, self.dist, trainer.state.step, shared, own,
                            keep=self.cfg.train.keep_checkpoints)
        except checkpoint.CheckpointError as e:  # raised on every rank alike (checkpoint.save agrees on it)
            if self.cfg.train.checkpoint_errors != "warn":
                raise
            log.warning("%s Training goes on without this checkpoint (train.checkpoint_errors=warn).", e)

    def save_final(self, trainer: Trainer) -> None:
        """The end of training, for a stage that goes on with other work (banks, evaluation) and checkpoints at
        all (train.checkpoint_every): a crash after it does not train again. Without checkpoints nothing is
        written: M teachers' full state is large, and a finished pipeline step is marked by done.json."""
        if self.cfg.train.checkpoint_every and trainer.state.step % self.cfg.train.checkpoint_every:
            self.save(trainer)

    def resume(self, trainer: Trainer) -> Path | None:
        """Restore the trainer (and workflow) from the requested checkpoint; None when starting afresh."""
        request, dist = resume_request(self.cfg), self.dist
        if not request:
            return None
        found = (checkpoint.load_newest(self.root, dist) if request == "auto"
                 else checkpoint.load_path(Path(request), dist))
        if found is None:
            if dist.is_main:
                log.info("train.resume=auto: no checkpoint in %s yet, starting from the beginning", self.root)
            return None
        directory, shared, own = found
        check_same_config(directory, shared["config"], self.cfg.to_dict())
        saved = shared.get("identity", {})
        if saved != self.identity:
            changed = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
            raise ConfigError(f"checkpoint {directory} was written while learning from other models ({', '.join(changed)} "
                              "changed since, e.g. the teachers were finetuned again): it cannot continue this run; "
                              "give this run another out_dir or remove the checkpoints")
        restore_state(trainer, shared, own)
        if hasattr(self.workflow, "load_state_dict"):
            state = dict(own.get("workflow", {}))
            if "workflow_cache" in shared:
                state["cache"] = shared["workflow_cache"]
            self.workflow.load_state_dict(state)
        if hasattr(self.workflow, "after_step"):  # cache stamps continue from the resumed step
            self.workflow.after_step(trainer.state.step)
        self.curve[:] = list(shared.get("curve", []))
        if dist.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", directory, trainer.state.step,
                     trainer.state.epoch, trainer.state.batches_done)
        return directory


def starts_over(stage: str, cfg, dist) -> None:
    """For the stages without mid-stage checkpoints (post-training and Stage I, minutes long): a resumed run
    trains them again from the beginning, and says so."""
    if resume_request(cfg) and dist.is_main:
        log.warning("stage %s keeps no mid-stage checkpoints: it starts again from the beginning", stage)
