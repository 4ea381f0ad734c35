"""``torchrun --standalone --nproc_per_node=N -m speedyrec.train [--config FILE.yaml] [key=value ...]``

With no arguments: the main job on the embedded synthetic default (generated on first use) with the
small pretrained encoder when the [pretrained] extra is installed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from speedyrec.config import ConfigError, check_implemented, config_yaml, load_config
from speedyrec.data.faults import DataError

log = logging.getLogger("speedyrec")


def implemented_features() -> dict[str, bool]:
    """Keys of features still to come; setting them truthy is rejected with "not implemented yet"."""
    return {}


def setup_logging(is_main: bool, out_dir: Path | None) -> None:
    level = logging.INFO if is_main else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / "train.log"))
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True)
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def format_metrics(m: dict) -> str:
    return f"AUC {m['auc']:.4f}  MRR {m['mrr']:.4f}  nDCG@5 {m['ndcg5']:.4f}  nDCG@10 {m['ndcg10']:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speedyrec.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. train.workflow=typical")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars: log lines only (for log files)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(args.config, args.overrides)
        check_implemented(cfg, implemented_features())
    except ConfigError as e:
        print(f"speedyrec: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0

    from speedyrec.engine import runlog
    from speedyrec.engine.checkpoint import CheckpointError
    from speedyrec.engine.distributed import init_distributed, shutdown

    runlog.QUIET = args.quiet
    from speedyrec.build import build_context
    from speedyrec.recipes.common import save_config

    dist = init_distributed()
    try:
        setup_logging(dist.is_main, Path(cfg.out_dir))
    except OSError as e:
        print(f"speedyrec: out_dir={cfg.out_dir} cannot be written ({e.strerror or e}): choose a writable out_dir",
              file=sys.stderr)
        shutdown()
        return 2
    log.info("stage %s, workflow %s, %d rank(s) on %s; outputs in %s", cfg.stage, cfg.train.workflow, dist.world,
             dist.device.type, cfg.out_dir)
    if dist.active:
        from speedyrec.engine.distributed import all_true, sees_rank0_directory

        mine = sees_rank0_directory(cfg.out_dir, dist.device, "out_dir")
        if not all_true(mine, dist.device):  # every rank knows: all stop, none waits for another
            print(f"speedyrec: rank {dist.rank} {'sees' if mine else 'does not see'} the file rank 0 wrote into "
                  f"out_dir={cfg.out_dir}, and not every rank does: out_dir must be one directory shared by every "
                  "node (a shared filesystem: checkpoints and outputs are written there by all ranks); the caches "
                  "(data.cache_dir) may be node-local", file=sys.stderr)
            shutdown()
            return 2
    from speedyrec.recipes.resume import restart_count

    if restart_count():  # said once here; every training stage then resumes from its own newest checkpoint
        log.info("torchrun restart %d: resuming from the newest checkpoints", restart_count())
    t0 = time.perf_counter()
    finished = False
    try:
        ctx = build_context(cfg, dist)
        save_config(ctx)
        result = recipe_class(cfg.stage)(ctx).run()
        if dist.is_main:
            print_summary(cfg, result, time.perf_counter() - t0)
        finished = True
    except (DataError, ConfigError, CheckpointError) as e:
        print(f"speedyrec: {e}", file=sys.stderr)
        return 2
    finally:
        # after a failure the other ranks may never reach a barrier: waiting for them would hang this one
        shutdown(wait_for_others=finished)
    return 0


def recipe_class(stage: str):
    from speedyrec.recipes.distill_finetune import DistillFinetuneRecipe
    from speedyrec.recipes.distill_posttrain import DistillPosttrainRecipe
    from speedyrec.recipes.finetune import FinetuneRecipe
    from speedyrec.recipes.finetune_teachers import FinetuneTeachersRecipe
    from speedyrec.recipes.newsbert import NewsBertRecipe
    from speedyrec.recipes.pipeline import PipelineRecipe
    from speedyrec.recipes.posttrain import PosttrainRecipe

    recipes = (FinetuneRecipe, PosttrainRecipe, DistillPosttrainRecipe, FinetuneTeachersRecipe, DistillFinetuneRecipe,
               NewsBertRecipe, PipelineRecipe)
    return {r.stage: r for r in recipes}[stage]


def print_summary(cfg, result: dict, total: float) -> None:
    metrics, stats = result["metrics"], result["stats"]
    if cfg.stage == "finetune":
        if metrics:
            print(f"final dev metrics: {format_metrics(metrics)}  ({metrics['impressions']} impressions)", flush=True)
        print(f"trained {stats['clicks_trained']:,} clicks in {stats['wall_seconds']:.1f} s "
              f"({stats['clicks_per_second']:.1f} clicks/s), data efficiency {stats['data_efficiency']:.1%}; "
              f"total {total:.0f} s; outputs in {cfg.out_dir}", flush=True)
        return
    if cfg.stage in ("finetune_teachers", "distill_finetune", "newsbert"):
        for name, m in metrics.items():
            if m.get("auc") is not None:
                print(f"{name}: {format_metrics(m)}", flush=True)
    print(f"stage {cfg.stage} done in {total:.0f} s; outputs in {cfg.out_dir}/{cfg.stage if cfg.stage != 'pipeline' else ''}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
