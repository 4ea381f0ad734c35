"""End-to-end training jobs with a tiny random encoder: exit codes, output files, stats.json counters and
the invariants of DESIGN.md, on the synthetic data set, the two real samples, 2 gloo ranks, resume,
determinism and user errors.

Jobs run in-process through ``speedyrec.train.main`` (it returns the exit code), except the 2-rank runs,
which go through ``torchrun``. Every job is kept small (max_steps, eval.max_impressions, short fields).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from speedyrec.config import load_config
from speedyrec.engine.checkpoint import read_part
from speedyrec.engine.memory import HeapTrimmer
from speedyrec.train import main

# stats.json counters DESIGN.md promises
DESIGN_COUNTERS = ("clicks_in_data", "clicks_trained", "sequences_dropped", "news_encoded", "cache_lookups",
                   "cache_hits", "served_age_mean", "served_age_max", "valid_tokens", "padded_tokens", "data_efficiency", "malformed_rows",
                   "unknown_news_ids", "wall_seconds", "clicks_per_second")
# the README's split of clicks_in_data
SPLIT_COUNTERS = ("clicks_unknown_news", "clicks_not_reached", "epochs")
METRICS = ("auc", "mrr", "ndcg5", "ndcg10")
EVAL_IMPRESSIONS = 40
TORCHRUN_TIMEOUT = 300


# -- helpers -----------------------------------------------------------------------------------------------
def synthetic_args(out_dir: Path, cache_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(out_dir, cache_dir, "data.format=synthetic", f"data.dir={data_dir}",
                          f"eval.max_impressions={EVAL_IMPRESSIONS}", *extra)


def read_json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def run_job(argv: list[str], out_dir: Path) -> tuple[dict, dict]:
    rc = main(argv)
    assert rc == 0, f"speedyrec.train {' '.join(argv)} exited with {rc}"
    return read_json(out_dir / "stats.json"), read_json(out_dir / "metrics.json")


def check_metrics(metrics: dict, max_impressions: int | None = EVAL_IMPRESSIONS) -> None:
    for k in METRICS:
        v = metrics[k]
        assert isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0, (k, v)
    # MRR and nDCG of a ranking with at least one click among non-clicks are > 0
    assert metrics["mrr"] > 0 and metrics["ndcg10"] > 0
    if max_impressions is not None:
        assert 0 < metrics["impressions"] <= max_impressions


def check_stats(stats: dict, *, full_epoch: bool) -> None:
    """The invariants every run keeps, whatever the workflow and ablation."""
    missing = [k for k in DESIGN_COUNTERS + SPLIT_COUNTERS if k not in stats]
    assert not missing, f"stats.json lacks {missing}"
    for k in DESIGN_COUNTERS:
        if k.startswith("served_age") and stats[k] is None and stats["cache_hits"] == 0:
            continue  # no row served, no age
        assert isinstance(stats[k], (int, float)) and math.isfinite(stats[k]) and stats[k] >= 0, (k, stats[k])
    # nothing is lost silently
    assert (stats["clicks_trained"] + stats["clicks_unknown_news"] + stats["clicks_not_reached"]
            == stats["epochs"] * stats["clicks_in_data"]), stats
    assert stats["clicks_trained"] > 0
    if full_epoch:
        assert stats["clicks_not_reached"] == 0, stats
    assert stats["sequences_dropped"] == 0
    assert stats["served_age_max"] is None or stats["served_age_max"] <= 20  # engine.cache_gamma
    assert stats["cache_hits"] <= stats["cache_lookups"]
    assert stats["news_encoded"] > 0 and stats["valid_tokens"] > 0
    tokens = stats["valid_tokens"] + stats["padded_tokens"]
    assert stats["data_efficiency"] == pytest.approx(stats["valid_tokens"] / tokens, rel=1e-9)
    assert 0.0 < stats["data_efficiency"] <= 1.0
    assert stats["wall_seconds"] > 0
    assert stats["clicks_per_second"] == pytest.approx(stats["clicks_trained"] / stats["wall_seconds"], rel=1e-6)
    # memory, per phase: each peak lies under the process's whole peak, and the end under the training peak
    assert stats["heap_trims"] >= 0 and stats["heap_trim_seconds"] >= 0
    for k in ("setup_peak_rss_mb", "train_peak_rss_mb"):
        assert stats[k] is None or 0 < stats[k] <= stats["peak_rss_mb"], (k, stats)
    if stats["train_peak_rss_mb"] is not None:
        assert stats["max_rank_rss_mb"] <= stats["train_peak_rss_mb"] + 1.0, stats


def without_timing(d: dict) -> dict:
    """What a run computed, without what the machine measured (times, memory)."""
    return {k: v for k, v in d.items() if "second" not in k and "rss" not in k}


# -- shared runs (one each per module) -----------------------------------------------------------------------
TYPICAL_EXTRA = ("train.workflow=typical", "data.title_tokens=16", "data.max_history=10", "train.negatives=2",
                 "train.batch_size=64")
SPEEDYFEED_EXTRA = ()  # the defaults: title_tokens=30, token_budget=20000


def _shared_run(tmp_path_factory, cache_dir, synthetic_small, name: str, extra: tuple) -> tuple:
    out = tmp_path_factory.mktemp(name)
    argv = synthetic_args(out, cache_dir, synthetic_small, *extra)
    stats, metrics = run_job(argv, out)
    return argv, out, stats, metrics


@pytest.fixture(scope="module")
def typical_run(tmp_path_factory, cache_dir, synthetic_small):
    return _shared_run(tmp_path_factory, cache_dir, synthetic_small, "typical", TYPICAL_EXTRA)


@pytest.fixture(scope="module")
def speedyfeed_run(tmp_path_factory, cache_dir, synthetic_small):
    return _shared_run(tmp_path_factory, cache_dir, synthetic_small, "speedyfeed", SPEEDYFEED_EXTRA)


@pytest.fixture(scope="module")
def every_click_run(tmp_path_factory, cache_dir, synthetic_small):
    """SpeedyFeed's own loss: every click of a user's sequence a target (history clicks against random news)."""
    return _shared_run(tmp_path_factory, cache_dir, synthetic_small, "every_click", ("engine.targets=all",))


# -- 1. the typical workflow -------------------------------------------------------------------------------
def test_typical_workflow_writes_outputs_and_keeps_invariants(typical_run):
    argv, out, stats, metrics = typical_run
    # config.yaml is the resolved config and loads back
    saved = load_config(str(out / "config.yaml"))
    expected = load_config(None, argv)
    assert expected.model.freeze_layers == -1
    expected.model.freeze_layers = 0  # -1 resolves to "nothing frozen" for a random encoder
    assert expected.train.amp == "auto"  # resolved by the machine: bf16 where the CPU has native bf16
    expected.train.amp = "bf16" if stats["precision"] == "bf16" else "off"
    assert expected.engine.chunk_tokens == 0
    expected.engine.chunk_tokens = 2048  # 0 (auto) resolves by the device: 2048 on a CPU
    assert saved == expected
    assert saved.train.workflow == "typical" and saved.out_dir == str(out)

    check_metrics(metrics)
    check_stats(stats, full_epoch=True)
    assert stats["workflow"] == "typical" and stats["world_size"] == 1
    # typical: one target per click of the training impressions, all trained in one epoch
    assert stats["clicks_trained"] == stats["clicks_in_data"]
    assert stats["steps"] == -(-stats["clicks_in_data"] // 64)
    # every instance encodes max_history + 1 + negatives news, without dedup and without the cache
    assert stats["news_encoded"] == stats["clicks_trained"] * (10 + 1 + 2)
    assert stats["negatives_scored"] == stats["clicks_trained"] * 2
    assert stats["cache_lookups"] == 0 and stats["cache_hits"] == 0
    # fixed padding to the field's maximum: every encoded news occupies title_tokens slots
    assert stats["valid_tokens"] + stats["padded_tokens"] == stats["news_encoded"] * 16
    assert stats["malformed_rows"] == 0 and stats["unknown_news_ids"] == 0
    assert (out / "train.log").is_file()
    assert (out / "checkpoints" / f"step_{stats['steps']}" / "model.safetensors").is_file()


# -- 2. the SpeedyFeed workflow -----------------------------------------------------------------------------
@pytest.mark.parametrize("targets", ["default", "every_click"])
def test_speedyfeed_full_epoch_trains_every_click_once(targets, speedyfeed_run, every_click_run, typical_run):
    _, out, stats, metrics = speedyfeed_run if targets == "default" else every_click_run
    check_metrics(metrics)
    check_stats(stats, full_epoch=True)
    assert stats["workflow"] == "speedyfeed"
    assert stats["sequences_dropped"] == 0
    assert stats["served_age_max"] is None or stats["served_age_max"] <= 20  # engine.cache_gamma
    # no unknown news in the synthetic data: every click of every sequence is a trained target
    assert stats["clicks_unknown_news"] == 0
    assert stats["clicks_trained"] == stats["clicks_in_data"]
    assert stats["sequences_trained"] == stats["sequences_in_data"] > 0
    assert stats["steps"] > 1  # the token budget splits the epoch into several batches
    assert stats["cache_lookups"] >= stats["cache_hits"]
    # one process, no global dedup: every distinct news of a batch is either read from the cache or encoded
    assert stats["news_encoded"] + stats["cache_hits"] == stats["cache_lookups"]
    # dedup at work: without it every news position would be encoded, each click once and its negatives; dedup
    # and the cache save over half of them
    negatives = load_config(str(out / "config.yaml")).engine.negatives
    assert negatives == 4  # the finetune default (engine.negatives=auto)
    assert stats["news_encoded"] < stats["clicks_trained"] * (1 + negatives) / 2
    if targets == "default":  # engine.targets=auto: the impressions' clicks, as the typical workflow counts them
        assert load_config(str(out / "config.yaml")).engine.targets == "impressions"
        assert stats["clicks_in_data"] == typical_run[2]["clicks_in_data"]
    else:  # histories are clicks too: the autoregressive epoch holds more targets than the impressions' clicks
        assert stats["clicks_in_data"] > typical_run[2]["clicks_in_data"]
    # dynamic batching pads far less than fixed padding
    assert stats["data_efficiency"] > typical_run[2]["data_efficiency"]


def test_speedyfeed_cache_serves_young_rows_and_the_audit_changes_nothing(tmp_path, cache_dir, synthetic_small):
    runs = {}
    for audit in (0, 6):
        out = tmp_path / f"audit{audit}"
        runs[audit] = run_job(synthetic_args(out, cache_dir, synthetic_small, "data.title_tokens=16",
                                             "engine.cache_beta=1.0", "engine.token_budget=2000", "engine.cache_gamma=3",
                                             f"engine.cache_audit={audit}"), out)
    stats, metrics = runs[6]
    check_metrics(metrics)
    check_stats(stats, full_epoch=True)
    assert stats["cache_hits"] > 0
    # ages come from the served rows themselves: never above gamma, and some rows are more than a step old
    assert 0 < stats["served_age_mean"] <= stats["served_age_max"] <= 3
    assert stats["news_encoded"] + stats["cache_hits"] == stats["cache_lookups"]
    assert stats["clicks_trained"] == stats["clicks_in_data"]
    # the audit re-encoded hits: drift is a cosine, and a trained encoder drifts a little from its cached rows
    assert 0 < stats["cache_audit_rows"] <= 6 * stats["steps"]
    assert -1.0 <= stats["cache_drift_cos_min"] <= stats["cache_drift_cos_mean"] < 1.0
    assert -1.0 <= stats["cache_noise_cos_mean"] <= 1.0 + 1e-6  # two fresh encodings differ by dropout alone
    # ... without changing training: same metrics and counters as the run without the audit
    plain_stats, plain_metrics = runs[0]
    assert plain_stats["cache_audit_rows"] == 0 and plain_stats["cache_drift_cos_mean"] is None
    assert {k: v for k, v in metrics.items() if k != "seconds"} == {k: v for k, v in plain_metrics.items() if k != "seconds"}
    assert (plain_stats["cache_hits"], plain_stats["served_age_max"]) == (stats["cache_hits"], stats["served_age_max"])


# -- 3. ablations -------------------------------------------------------------------------------------------
ABLATIONS = {
    "no_autoregressive": ("engine.autoregressive=false",),
    "fixed_padding": ("engine.dynamic_batching=false",),
    "no_dedup": ("engine.dedup=false",),
    "no_cache": ("engine.cache=false",),
    "buslm": ("engine.buslm=true", "data.abstract_tokens=24", "data.body_tokens=32"),
    "refine": ("engine.refine=true", "data.body_tokens=32"),
    "frozen_prefix": ("model.freeze_layers=1",),
    "grad_accum": ("train.grad_accum=2",),
    "inbatch_negatives": ("engine.inbatch_negatives=true",),
}
ABLATION_STEPS = 3


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_keeps_the_invariants(name, tmp_path, cache_dir, synthetic_small, speedyfeed_run):
    out = tmp_path / name
    extra = ABLATIONS[name]
    stats, metrics = run_job(synthetic_args(out, cache_dir, synthetic_small, "data.title_tokens=16",
                                            "engine.token_budget=2000", f"train.max_steps={ABLATION_STEPS}",
                                            *extra), out)
    check_metrics(metrics)
    check_stats(stats, full_epoch=False)
    assert stats["steps"] == ABLATION_STEPS
    assert 0 < stats["clicks_trained"] < stats["clicks_in_data"]
    # the ablations change how targets are batched and encoded, never what an epoch holds
    assert stats["clicks_in_data"] == speedyfeed_run[2]["clicks_in_data"]
    assert stats["clicks_unknown_news"] == 0
    saved = load_config(str(out / "config.yaml"))
    if name == "no_autoregressive":
        # one unit per click: every unit trains exactly one target
        assert stats["sequences_in_data"] == stats["clicks_in_data"]
        assert stats["sequences_trained"] == stats["clicks_trained"]
    if name == "fixed_padding":
        # every news is padded to the field's maximum
        assert stats["valid_tokens"] + stats["padded_tokens"] == stats["news_encoded"] * 16
        assert stats["sequences_trained"] == ABLATION_STEPS * saved.train.batch_size
    if name == "no_dedup":
        assert stats["news_encoded"] + stats["cache_hits"] == stats["cache_lookups"]
    if name == "no_cache":
        assert stats["cache_lookups"] == 0 and stats["cache_hits"] == 0
    if name == "buslm":
        assert saved.engine.buslm and saved.data.body_tokens == 32
    if name == "frozen_prefix":
        assert saved.model.freeze_layers == 1
    if name == "grad_accum":
        assert saved.train.grad_accum == 2
    # every target is scored against its sampled negatives; in-batch, against the batch's news its user did not click
    sampled = stats["clicks_trained"] * saved.engine.negatives
    if name == "inbatch_negatives":
        assert stats["negatives_scored"] > sampled
    else:
        assert stats["negatives_scored"] == sampled


def test_no_dedup_encodes_more_than_dedup(tmp_path, cache_dir, synthetic_small):
    """The first steps with and without dedup: more encoding per trained target without it (the token budget
    counts every occurrence then, so its batches hold fewer targets)."""
    common = ("data.title_tokens=16", "engine.token_budget=2000", "train.max_steps=2", "engine.cache=false")
    runs = {}
    for dedup in ("true", "false"):
        out = tmp_path / f"dedup_{dedup}"
        runs[dedup], _ = run_job(synthetic_args(out, cache_dir, synthetic_small, *common, f"engine.dedup={dedup}"), out)
    per_target = {k: r["news_encoded"] / r["clicks_trained"] for k, r in runs.items()}
    assert per_target["false"] > per_target["true"], per_target
    for s in runs.values():
        check_stats(s, full_epoch=False)


def test_grad_accum_full_epoch(tmp_path, cache_dir, synthetic_small, speedyfeed_run):
    """Accumulating 2 micro-batches per optimizer step trains the same epoch in half the steps."""
    out = tmp_path / "accum"
    stats, metrics = run_job(synthetic_args(out, cache_dir, synthetic_small, *SPEEDYFEED_EXTRA,
                                            "train.grad_accum=2", "engine.cache=false"), out)
    check_metrics(metrics)
    check_stats(stats, full_epoch=True)
    assert stats["clicks_trained"] == stats["clicks_in_data"] == speedyfeed_run[2]["clicks_in_data"]
    assert stats["steps"] == -(-speedyfeed_run[2]["steps"] // 2)


# -- 4. the real samples ------------------------------------------------------------------------------------
def test_mind_sample_typical(tmp_path, cache_dir, mind_sample):
    out = tmp_path / "mind"
    stats, metrics = run_job(tiny_overrides(out, cache_dir, "train.workflow=typical", "data.format=mind",
                                            f"data.dir={mind_sample}", "data.title_tokens=16", "data.max_history=10",
                                            "train.negatives=2", f"eval.max_impressions={EVAL_IMPRESSIONS}"), out)
    check_stats(stats, full_epoch=True)
    # ~96% of the slice's ids are not in its news file: counted, never aliased
    assert stats["unknown_news_ids"] > 300_000
    assert stats["clicks_unknown_news"] > 0
    assert stats["clicks_trained"] + stats["clicks_unknown_news"] == stats["clicks_in_data"]
    check_metrics(metrics)


def test_mind_sample_two_epochs_keep_the_click_invariant(tmp_path, cache_dir, mind_sample):
    """DESIGN.md: clicks_trained + clicks_unknown_news + clicks_not_reached == epochs * clicks_in_data."""
    out = tmp_path / "mind2"
    stats, _ = run_job(tiny_overrides(out, cache_dir, "train.workflow=typical", "data.format=mind",
                                      f"data.dir={mind_sample}", "data.title_tokens=16", "data.max_history=10",
                                      "train.negatives=2", "train.epochs=2", f"eval.max_impressions={EVAL_IMPRESSIONS}"), out)
    assert stats["epochs"] == 2 and stats["clicks_unknown_news"] > 0
    assert stats["clicks_not_reached"] == 0  # both epochs ran to the end
    assert stats["clicks_trained"] > 0 and stats["clicks_trained"] % 2 == 0  # the same known clicks, twice
    accounted = stats["clicks_trained"] + stats["clicks_unknown_news"] + stats["clicks_not_reached"]
    assert accounted == 2 * stats["clicks_in_data"], (
        f"clicks_trained {stats['clicks_trained']} + clicks_unknown_news {stats['clicks_unknown_news']} + "
        f"clicks_not_reached {stats['clicks_not_reached']} = {accounted} != epochs 2 * clicks_in_data "
        f"{stats['clicks_in_data']}")
    check_stats(stats, full_epoch=True)


def test_speedyrec_sample_speedyfeed(tmp_path, cache_dir, speedyrec_sample):
    out = tmp_path / "speedyrec"
    stats, metrics = run_job(tiny_overrides(out, cache_dir, "data.format=speedyrec", f"data.dir={speedyrec_sample}",
                                            "data.title_tokens=16", f"eval.max_impressions={EVAL_IMPRESSIONS}"), out)
    check_stats(stats, full_epoch=True)
    assert stats["glued_ids"] > 0  # the real missing-separator fault, split into known ids
    assert stats["clicks_trained"] + stats["clicks_unknown_news"] == stats["clicks_in_data"]
    check_metrics(metrics)


# -- 5. two gloo ranks ---------------------------------------------------------------------------------------
def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m speedyrec.train ARGS`` on gloo; prints its output on failure."""
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else ([shutil.which("torchrun")] if shutil.which("torchrun")
                                                 else [sys.executable, "-m", "torch.distributed.run"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [*launcher, "--standalone", "--nproc_per_node=2", "-m", "speedyrec.train", *args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out after {TORCHRUN_TIMEOUT} s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    if proc.returncode != 0:
        print(f"$ {' '.join(cmd)}\nexit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, cache_dir, synthetic_small, speedyfeed_run):
    """The 1-process speedyfeed job again, on 2 gloo ranks, without and with global dedup.

    The exit codes are checked by the tests, so that each reports its own run."""
    assert speedyfeed_run  # run first: it also fills the token and vocabulary cache the ranks read
    runs = {}
    # the global-dedup run also hands the heap back every 2 steps, on each rank
    # and with deferred cache gradients under bf16 autocast (a cache that serves from the first steps, short expiry)
    deferred = ("engine.global_dedup=true", "train.amp=bf16", "engine.cache_deferred_grad=true", "engine.cache_beta=0.5",
                "engine.cache_gamma=3")
    for name, extra in (("local_dedup", ()), ("global_dedup", ("engine.global_dedup=true", "train.heap_trim_every=2")),
                        ("deferred", deferred)):
        out = tmp_path_factory.mktemp(f"ddp_{name}")
        runs[name] = (out, torchrun(synthetic_args(out, cache_dir, synthetic_small, *SPEEDYFEED_EXTRA, *extra), cwd=out))
    return runs


def assert_exit_zero(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"torchrun exited with {proc.returncode}\n--- stdout (tail):\n{proc.stdout[-3000:]}"
                                  f"\n--- stderr (tail):\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("name", ["local_dedup", "global_dedup"])
def test_two_ranks_train_the_whole_epoch(name, two_rank_runs, speedyfeed_run):
    out, proc = two_rank_runs[name]
    assert_exit_zero(proc)
    assert "final dev metrics" in proc.stdout
    # rank 0 wrote the outputs
    for f in ("config.yaml", "metrics.json", "stats.json", "train.log"):
        assert (out / f).is_file(), f
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert {p.name for p in newest.iterdir()} == {f"{part}.{ext}" for part in ("model", "rank0", "rank1")
                                                  for ext in ("safetensors", "json")} | {"meta.json"}  # every rank's part
    assert load_config(str(out / "config.yaml")).engine.global_dedup is (name == "global_dedup")
    stats, metrics = read_json(out / "stats.json"), read_json(out / "metrics.json")
    check_metrics(metrics)
    check_stats(stats, full_epoch=True)
    assert stats["world_size"] == 2
    assert stats["sequences_dropped"] == 0
    # summed over ranks, a full epoch trains every click once, as one process does
    assert stats["clicks_trained"] == stats["clicks_in_data"]
    one = speedyfeed_run[2]
    assert one["world_size"] == 1
    assert stats["clicks_in_data"] == one["clicks_in_data"]
    assert stats["clicks_trained"] == one["clicks_trained"]
    assert stats["sequences_in_data"] == stats["sequences_trained"] == one["sequences_trained"]
    if name == "local_dedup":  # each rank encodes what it did not read from the cache
        assert stats["news_encoded"] + stats["cache_hits"] == stats["cache_lookups"]
    # every rank trims after every 2nd optimizer step (summed over ranks); glibc-less systems cannot trim
    every = load_config(str(out / "config.yaml")).train.heap_trim_every
    trims = 2 * (stats["steps"] // every) if HeapTrimmer(every).available else 0
    assert stats["steps"] >= 2 and stats["heap_trims"] == trims, (stats["steps"], every, stats["heap_trims"])


def test_two_ranks_bf16_hand_deferred_cache_gradients_over(two_rank_runs):
    out, proc = two_rank_runs["deferred"]
    assert_exit_zero(proc)
    stats = read_json(out / "stats.json")
    check_stats(stats, full_epoch=True)
    assert stats["world_size"] == 2 and stats["clicks_trained"] == stats["clicks_in_data"]
    assert stats["cache_hits"] > 0 and stats["deferred_grad_rows"] > 0
    assert math.isfinite(read_json(out / "metrics.json")["auc"])


def test_global_dedup_encodes_fewer_news(two_rank_runs):
    local = read_json(two_rank_runs["local_dedup"][0] / "stats.json")
    glob = read_json(two_rank_runs["global_dedup"][0] / "stats.json")
    # the same batches and cache decisions; news held by both ranks are encoded once instead of twice
    assert glob["cache_lookups"] == local["cache_lookups"]
    assert glob["cache_hits"] == local["cache_hits"]
    assert glob["news_encoded"] < local["news_encoded"]
    assert glob["clicks_trained"] == local["clicks_trained"]


# -- 6. determinism -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("workflow", ["typical", "speedyfeed"])
def test_same_seed_same_metrics_other_seed_differs(workflow, tmp_path, cache_dir, synthetic_small):
    extra = (TYPICAL_EXTRA if workflow == "typical" else ("data.title_tokens=16", "engine.token_budget=2000",
                                                           "engine.cache_beta=0.5"))
    results = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        results[name] = run_job(synthetic_args(out, cache_dir, synthetic_small, *extra, "model.dropout=0",
                                               "train.max_steps=4", f"train.seed={seed}"), out)
    (sa, ma), (sb, mb), (_, mc) = results["a"], results["b"], results["c"]
    check_metrics(ma)
    assert {k: ma[k] for k in METRICS} == {k: mb[k] for k in METRICS}
    assert without_timing(sa) == without_timing(sb)
    assert {k: ma[k] for k in METRICS} != {k: mc[k] for k in METRICS}


# -- 7. resume ----------------------------------------------------------------------------------------------
def test_resume_continues_from_the_checkpoint(tmp_path, cache_dir, synthetic_small, capsys):
    common = ("data.title_tokens=16", "engine.token_budget=2000")
    out = tmp_path / "resumed"
    first, _ = run_job(synthetic_args(out, cache_dir, synthetic_small, *common, "train.max_steps=3",
                                      "train.checkpoint_every=1"), out)
    assert first["steps"] == 3
    assert {p.name for p in (out / "checkpoints").glob("step_*")} == {"step_1", "step_2", "step_3"}
    capsys.readouterr()
    second, metrics = run_job(synthetic_args(out, cache_dir, synthetic_small, *common, "train.resume=auto",
                                             "train.max_steps=6"), out)
    log = capsys.readouterr().out
    assert "resumed from" in log and "at step 3" in log
    assert second["steps"] == 6
    assert read_part(out / "checkpoints" / "step_6", "model")["step"] == 6
    assert len(list((out / "checkpoints").glob("step_*"))) == 3  # train.keep_checkpoints
    check_metrics(metrics)
    check_stats(second, full_epoch=False)
    # the counters carry over: 6 steps of targets, the same ones an uninterrupted 6-step run trains
    assert second["clicks_trained"] > first["clicks_trained"]
    straight_out = tmp_path / "straight"
    straight, _ = run_job(synthetic_args(straight_out, cache_dir, synthetic_small, *common, "train.max_steps=6"),
                          straight_out)
    assert second["clicks_trained"] == straight["clicks_trained"]
    assert second["sequences_trained"] == straight["sequences_trained"]


def test_resume_from_a_missing_checkpoint_is_a_user_error(tmp_path, cache_dir, synthetic_small, capsys):
    out = tmp_path / "bad_resume"
    missing = tmp_path / "nowhere" / "step_3"
    rc = main(synthetic_args(out, cache_dir, synthetic_small, "data.title_tokens=16", f"train.resume={missing}"))
    assert rc == 2
    assert_one_line_error(capsys, "train.resume", str(missing))
    assert not (out / "stats.json").exists()


# -- 8. user errors -----------------------------------------------------------------------------------------
def write_mind_dir(root: Path, bad_line: int | None) -> Path:
    """A tiny MIND-format split; ``bad_line`` (1-based) of behaviors.tsv gets 3 columns instead of 5."""
    root.mkdir(parents=True)
    words = ["storm", "market", "team", "vote", "film", "cup", "rates", "star", "coach", "tax", "rain", "song"]
    news = []
    for i in range(12):
        title = " ".join(words[(i + j) % len(words)] for j in range(5))
        news.append(f"N{i}\tcat{i % 3}\tsub\t{title}\tan abstract about {words[i]}\thttp://x/{i}\t[]\t[]")
    (root / "news.tsv").write_text("\n".join(news) + "\n")
    rows = []
    for i in range(20):
        hist = " ".join(f"N{(i + k) % 12}" for k in range(3))
        imp = " ".join(f"N{(i + k) % 12}-{int(k == 3)}" for k in range(3, 7))
        rows.append(f"{i + 1}\tU{i % 5}\t11/{10 + i // 10}/2019 {1 + i % 12}:00:00 AM\t{hist}\t{imp}")
    if bad_line is not None:
        rows[bad_line - 1] = f"{bad_line}\tU0\tnot enough columns"
    (root / "behaviors.tsv").write_text("\n".join(rows) + "\n")
    return root


def assert_one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line message on stderr, got:\n{err}"
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_unknown_key_names_the_nearest(tmp_path, cache_dir, capsys):
    rc = main(tiny_overrides(tmp_path / "o", cache_dir, "train.epoch=2"))
    assert rc == 2
    assert_one_line_error(capsys, "train.epoch", "train.epochs")
    assert not (tmp_path / "o").exists()  # rejected before anything is written


def test_bad_value_names_the_key(tmp_path, cache_dir, capsys):
    rc = main(tiny_overrides(tmp_path / "o", cache_dir, "train.max_steps=many"))
    assert rc == 2
    assert_one_line_error(capsys, "train.max_steps")


def test_missing_data_dir(tmp_path, cache_dir, capsys):
    missing = tmp_path / "no_such_dir"
    rc = main(tiny_overrides(tmp_path / "o", cache_dir, "data.format=mind", f"data.dir={missing}"))
    assert rc == 2
    assert_one_line_error(capsys, str(missing))


def test_strict_stops_at_the_bad_row_with_file_and_line(tmp_path, cache_dir, capsys):
    data = write_mind_dir(tmp_path / "mind", bad_line=7)
    rc = main(tiny_overrides(tmp_path / "o", cache_dir, "data.format=mind", f"data.dir={data}", "data.strict=true"))
    assert rc == 2
    assert_one_line_error(capsys, f"{data / 'behaviors.tsv'}:7", "column")


def test_lenient_counts_the_bad_row_and_trains(tmp_path, cache_dir):
    data = write_mind_dir(tmp_path / "mind", bad_line=7)
    out = tmp_path / "o"
    stats, _ = run_job(tiny_overrides(out, cache_dir, "train.workflow=typical", "data.format=mind",
                                      f"data.dir={data}", "data.dev_fraction=0.2", "train.batch_size=4"), out)
    assert stats["malformed_rows"] == 1
    check_stats(stats, full_epoch=True)
    assert stats["clicks_trained"] == stats["clicks_in_data"] == 15  # 19 good rows, the last 4 (20%) are dev


def test_posttraining_more_layers_than_the_encoder_has(tmp_path, cache_dir, capsys):
    rc = main(tiny_overrides(tmp_path / "o", cache_dir, "stage=posttrain", "posttrain.train_layers=3"))
    assert rc == 2
    assert_one_line_error(capsys, "posttrain.train_layers=3", "has 2 layers")


def test_refine_is_rejected_in_the_typical_workflow(tmp_path, cache_dir, capsys):
    rc = main(tiny_overrides(tmp_path / "o", cache_dir, "engine.refine=true", "train.workflow=typical"))
    assert rc == 2
    assert_one_line_error(capsys, "engine.refine", "typical")


def test_typical_workflow_on_speedyfeeds_targets(tmp_path, cache_dir, synthetic_small, every_click_run):
    """train.typical_targets=sequence: the typical workflow trains every click of the user sequences, each
    from the clicks before its impression (at most max_history), with the engine's negatives."""
    import numpy as np

    from speedyrec.data.dataset import load_dataset
    from speedyrec.workflows.typical import TypicalWorkflow

    cfg = load_config(None, synthetic_args(tmp_path / "o", cache_dir, synthetic_small, *TYPICAL_EXTRA))
    ds = load_dataset(cfg.data)
    store = type("Store", (), {"num_news": len(ds.news), "max_len": 16})()
    wf = TypicalWorkflow(ds.train, store, None, max_history=10, negatives=2, batch_size=64, seed=0, rank=0, world=1,
                         device=torch.device("cpu"), targets="sequence")
    seqs = wf.seqs
    assert wf.clicks_in_data == every_click_run[2]["clicks_in_data"]  # identical targets
    inst = np.random.default_rng(0).choice(len(seqs.clicks.values), 200, replace=False)
    positives, pools, histories, _ = wf._sequence_instances(inst)
    seq_of = seqs.clicks.row_ids()
    for j, c in enumerate(inst):  # slow reference: walk back to the impression's first click, then take history
        start = seqs.clicks.offsets[seq_of[c]]
        first = c
        while first > start and seqs.click_pool[c] >= 0 and seqs.click_pool[first - 1] == seqs.click_pool[c]:
            first -= 1
        want = seqs.clicks.values[max(start, first - 10):first]
        assert histories.row(j).tolist() == want.tolist()
        assert positives[j] == seqs.clicks.values[c]
        assert pools.row(j).tolist() == (seqs.pools.row(seqs.click_pool[c]).tolist() if seqs.click_pool[c] >= 0 else [])
    out = tmp_path / "run"
    stats, _ = run_job(synthetic_args(out, cache_dir, synthetic_small, *TYPICAL_EXTRA, "train.typical_targets=sequence",
                                      "train.max_steps=3"), out)
    assert stats["clicks_in_data"] == every_click_run[2]["clicks_in_data"] and stats["clicks_trained"] == 3 * 64


def test_dev_curve_and_early_stopping(tmp_path, cache_dir, synthetic_small, capsys):
    """Periodic dev evaluations are recorded in dev_curve.json; with nothing learning (zero learning rates) the
    AUC never improves on the first evaluation, so eval.patience=2 stops training after the third. The same
    scalars go to log.jsonl and the TensorBoard events, and progress bars are shown."""
    out = tmp_path / "curve"
    stats, metrics = run_job(synthetic_args(out, cache_dir, synthetic_small, "data.title_tokens=16",
                                            "engine.token_budget=2000", "train.lr=0", "train.encoder_lr=0",
                                            "eval.every=1", "eval.patience=2", "train.max_steps=20",
                                            "train.log_every=1"), out)
    err = capsys.readouterr().err
    assert "training" in err and "click" in err and "encoding dev news" in err  # the bars
    check_run_log(out, stats, read_json(out / "dev_curve.json")["points"])
    points = read_json(out / "dev_curve.json")["points"]
    assert [p["step"] for p in points] == [1, 2, 3]
    assert stats["steps"] == 3
    seconds = [p["train_seconds"] for p in points]
    assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(stats["wall_seconds"], abs=0.05)
    clicks = [p["clicks_trained"] for p in points]
    assert clicks == sorted(clicks) and clicks[-1] == stats["clicks_trained"]
    assert len({p["auc"] for p in points}) == 1  # nothing learnt
    assert {k: metrics[k] for k in METRICS} == {k: points[-1][k] for k in METRICS}  # the last one is reused


def test_patience_needs_periodic_evaluation(tmp_path, cache_dir, capsys):
    out = tmp_path / "no_periodic"
    assert main(tiny_overrides(out, cache_dir, "eval.patience=2")) == 2
    assert_one_line_error(capsys, "eval.every")


def check_run_log(out: Path, stats: dict, points: list[dict]) -> None:
    """log.jsonl and the TensorBoard event file hold the train scalars of every step and the dev metrics of every
    evaluation; the event file is read back frame by frame (CRCs checked), and by TensorBoard when installed."""
    from speedyrec.engine.runlog import read_events

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    dev = [r for r in records if r["kind"] == "dev"]
    assert [r["step"] for r in train] == list(range(1, stats["steps"] + 1))
    for r in train:
        assert r["loss"] > 0 and r["targets_per_second"] > 0 and 0 < r["data_efficiency"] <= 1 and "lr" in r
    assert [(r["step"], r["auc"]) for r in dev] == [(p["step"], p["auc"]) for p in points]
    files = list(out.glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = read_events(files[0])
    assert events[0]["file_version"] == "brain.Event:2"
    tb = {(e["step"], tag): v for e in events for tag, v in e["scalars"].items()}
    for r in train:
        assert tb[(r["step"], "train/loss")] == pytest.approx(r["loss"], rel=1e-6)
    for r in dev:
        assert tb[(r["step"], "dev/auc")] == pytest.approx(r["auc"], rel=1e-6)
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    acc = EventAccumulator(str(out))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("dev/auc")] == [(r["step"], r["auc"]) for r in dev]
    assert {"train/loss", "train/lr", "train/targets_per_second", "train/data_efficiency"} <= set(acc.Tags()["scalars"])


def test_print_config_shows_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    import yaml

    out = tmp_path / "never"
    assert main(["--print-config", f"out_dir={out}", "train.lr=4e-4", "engine.token_budget=2_000"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 4e-4 and printed["engine"]["token_budget"] == 2000
    assert not out.exists()
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert load_config(str(tmp_path / "printed.yaml"), []).to_dict() == printed  # it loads back as it was


def test_quiet_shows_no_bars(tmp_path, cache_dir, synthetic_small, capsys):
    out = tmp_path / "quiet"
    assert main(["--quiet", *synthetic_args(out, cache_dir, synthetic_small, "train.workflow=typical",
                                            "data.title_tokens=16", "train.max_steps=1")]) == 0
    assert "training" not in capsys.readouterr().err
    assert (out / "log.jsonl").is_file() and list(out.glob("events.out.tfevents.*"))  # every run has them
