"""Tiny-NewsRec's Figure 5 and A.4 on our models: size, news encoded per second at fp32, bf16 and int8 with the
dev AUC each precision keeps, and the wall time of every pipeline step per student size.

``python -m benchmarks.efficiency [--quick] [--seeds 0,1,2] [--layers 1,2,4] [--out DIR] [--kept-only] [--fresh]``

The runs, per seed S, in ``--out``:

- ``base_seed_S`` (benchmarks.quality's ``seed_base_run``: ``stage=pipeline pipeline.baselines=true
  pipeline.newsbert=false``): the M teachers and the 2-layer student. Shared with benchmarks.ablation,
  kd_methods and student_gap in the same ``--out``: kept there, or run first (32 min here, on quiet cores).
- ``eff_l1_seed_S``, ``eff_l4_seed_S``, the students of the other sizes (quality's ``student_run``:
  ``stage=pipeline train.seed=S distill.student_layers=N`` with ``pipeline.teachers_from`` the base run): only
  Stage I and Stage II train, ~6 min for 1 layer and ~19 min for 4 layers here. A run of benchmarks.quality
  kept in the same ``--out`` as ``seed_S_lN`` (the same student, trained beside its baselines, its teachers
  linked from that seed's quality or base run) is used instead when it is there.

With the base run kept, a seed costs 15 min here (seed 1 on quiet cores): the 1- and 4-layer students' Stage I
and II, 12 dev evaluations (4 models at 3 precisions), then the timing; without it, 32 min more.

Across sessions (run folders do not survive a session; the results file does): each model's dev metrics at each
precision are recorded per seed in ``benchmarks/results/efficiency.json`` (``per_seed``: seed -> model -> the run
it comes from, the commit and date it was measured, its parameters and ``metrics`` per precision), beside the
records of the runs (``runs``: their commands, commits and step times). A later invocation reuses a recorded
model of a seed whose run ran the settings this code would run (quality's ``same_settings`` on the run's command),
without its model files, and measures only what is missing: ``--seeds 1`` adds seed 1 beside seed 0; a recorded
model whose run's settings differ from today's is left out of the tables (and of the file, when it is rewritten). ``--fresh`` measures the seeds asked
for again (the other seeds' records and the speed history stay). ``--kept-only`` trains, evaluates and times
nothing: it re-renders the tables from the results file.

- Models: the Tiny-NewsRec student of each size (Stage II's ``student.safetensors``) and the teacher: the base
  run's best post-trained, finetuned 6-layer teacher by its dev AUC (PLM-NR DP, ``finetune_teachers/teachers/``).
  Each is loaded as Stage II loads teachers (``load_finetuned_recommender``: rebuilt on the PLM, checksum verified).
- Precisions (``speedyrec.models.inference.inference_model``, one function for speed and AUC): fp32; bf16 (the
  transformer's weights in bf16 under bf16 autocast), where the CPU computes bf16 natively; int8 (torch.ao dynamic
  quantisation of the transformer layers' linear maps; embeddings, attention, poolings and the user encoder in
  float32).
- Speed: news encoded per second through the export's and evaluation's path (``encode_news``: token rows from the
  store, length-sorted batches of ``--batch`` news, the news encoder, float32 vectors out), on a fixed sample of
  the news table's titles (``data.title_tokens`` tokens at most, as trained), in inference mode, with every core's
  thread. The architecture, not the seed, sets the speed: an invocation times the models it evaluated (per model,
  those of its lowest seed), all together. Each variant is warmed up by one block; then ``--rounds`` rounds time
  one block per variant in turn (interleaved, so a busy moment of the machine falls on all alike) and the median
  is kept. Ratios are against the fp32 teacher of the same invocation. Every invocation's timing is kept in
  ``speed_history`` (its commit, date, command, threads, load average before and after); the speed table is the
  latest invocation's that timed every model (the teacher, the 1-, 2- and 4-layer students) at every precision
  the machine runs (else the latest one's, said so), and the md names it. Parameters are counted on the float
  model, embeddings included (as the paper's Table 3 counts model size) and excluded.
- AUC: each seed's models evaluated on dev at each precision through the project's evaluation
  (``evaluate_models``; the news encoder at that precision, the user encoder under the same autocast for bf16
  and in float32 for int8); mean ± std over the recorded seeds (``rows[].auc``; each seed's in
  ``rows[].auc_per_seed`` and, every metric, in ``per_seed``), and the paired difference to the same model at fp32.
  The goal (the 2-layer student at its best precision ≥ 5x the fp32 teacher's news/s, its AUC there within 0.3
  points of its fp32 self) reads the speed table's invocation and the AUC over all recorded seeds.
- Why torch.ao for int8: it quantises the project's own modules in place, so speed and AUC run the same code
  as fp32 (our attention kernels, ``encode_news``, ``evaluate_models``), with no second runtime and no graph export
  of the backbone. ONNX Runtime's dynamic quantisation was tried on the 2-layer MiniLM student: its int8 vectors
  were closer to fp32 (3.4% of a vector's norm at worst, against 10% here with 8-bit activations, 20% with torch's
  default 7), at a similar speed on this busy machine, but it needs the news encoder exported per model, the
  poolings kept out of its quantiser by hand (it quantises their matrix-vector products into a kernel that
  refuses them), and a second encoding path for the AUC. torch.ao's eager quantisation is deprecated in favour of
  torchao, whose int8 path on CPUs is fast under torch.compile; it still runs on the torch this project pins.
- Stage times (A.4): each step's wall time from the recorded runs (``metrics.json`` seconds), median over seeds
  with the range: the teacher's steps (post-training, teacher finetuning) from the base run, each student's (Stage I, Stage II) from
  its size's run; the baselines' steps (the student finetuned alone, NewsBERT) only where a run trained them (the
  base run trains the plain 2-layer student; quality's ``seed_S_lN`` runs both); beside the paper's A.4 hours.
  The teachers' banks (their vectors, which both stages read) are built once per seed, by the base run; the other
  sizes read them. Each step is counted without them (stats.json ``bank_seconds``) and they get a row of their own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common, quality
from benchmarks.common import machine, md_table, source_commit, write_results

PRECISIONS = ("fp32", "bf16", "int8")
TEACHER_LAYERS = quality.PLM_LAYERS
FULL_SIZES = (1, 2, 4)  # a speed table is complete when it timed the teacher and these students at every precision
GOAL_SPEEDUP = 5.0  # the 2-layer student at its best precision against the fp32 teacher
GOAL_AUC_POINTS = 0.3  # its AUC at that precision within this many points of its fp32 self
PAPER_SPEEDUP = (2.0, 8.0)  # Figure 5: 4- to 1-layer students against the 12-layer teacher
PAPER_FEWER_PARAMS = (0.5, 0.7)
PAPER_PARAMS_M = {12: 109.89, 4: 53.18, 2: 39.01, 1: 31.92}  # Table 3's model sizes, millions
# A.4, hours: the 12-layer teacher, then the 4-, 2- and 1-layer students
PAPER_HOURS = {"posttrain": {"teacher": 12, 4: 10, 2: 8, 1: 6},  # post-training / Stage I, News, 1 GPU
               "finetune": {"teacher": 12, 4: 10, 2: 8, 1: 6},  # finetuning / Stage II, MIND, 4 GPUs
               "finetune_feeds": {"teacher": 3, 4: 2.5, 2: 2, 1: 1.5}}
STEPS = (("posttrain", "teacher post-training (M snapshots)", "teacher"),
         ("distill_posttrain", "Stage I: distillation on title-body matching", "student"),
         ("finetune_teachers", "teachers finetuned on clicks (M + the plain one, one pass)", "teacher"),
         ("distill_finetune", "Stage II: distillation on clicks", "student"),
         ("student_plain", "baseline: the student finetuned alone (where a run trained it)", "student"),
         ("newsbert", "baseline: NewsBERT, teacher and student jointly (where a run trained it)", "student"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.efficiency", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="quality's quick pipelines (tiny random encoders)")
    p.add_argument("--seeds", default=None, help="default 0,1,2 (--quick: 0); seeds recorded in the results file "
                   "are reused, not measured again")
    p.add_argument("--layers", default="1,2,4", help="student sizes")
    p.add_argument("--out", default="", help="the runs are kept (or found) here, beside the seeds' base runs "
                   "(base_seed_S) (default: a temporary folder)")
    p.add_argument("--fresh", action="store_true", help="measure the seeds asked for again, even those recorded")
    p.add_argument("--kept-only", action="store_true", help="train, evaluate and time nothing: re-render the tables "
                   "from the results file")
    p.add_argument("--batch", type=int, default=256, help="news per encoder call (a server's batch)")
    p.add_argument("--news", type=int, default=0, help="news per timed block (default 2048; quick 512)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds per variant (default 7; quick 2)")
    a = p.parse_args(argv)
    info = machine()
    seeds = quality.seed_list(a.seeds, a.quick)
    sizes = sorted({int(n) for n in a.layers.split(",")})
    news, rounds = a.news or (512 if a.quick else 2048), a.rounds or (2 if a.quick else 7)
    command = "python -m benchmarks.efficiency " + " ".join(argv if argv is not None else sys.argv[1:])
    saved = recorded_results(a.quick)
    per_seed, runs = recorded_measurements(saved, a.quick), dict(saved.get("runs", {}))
    history = list(saved.get("speed_history", []))
    if a.out:  # runs still kept there say what their steps spent on the teachers' banks
        for name, run in runs.items():
            bank_seconds_of(run, Path(a.out) / name)
    if a.kept_only:
        if not per_seed and not history:
            raise SystemExit(f"benchmarks.efficiency: nothing is recorded in {results_path(a.quick)} yet")
        return write(per_seed, runs, history, info, a.quick, command)
    timed: dict = {}  # variant -> (seed, model, context): the models this invocation times
    payload = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            have = per_seed.get(str(seed), {})
            todo = [v for v in variant_names(sizes) if a.fresh or v not in have]
            if not todo:
                print(f"seed {seed}: every model recorded in {results_path(a.quick)}: reused, nothing to measure "
                      "(--fresh measures it again)", flush=True)
                continue
            entries, seed_runs = measure_seed(root, seed, todo, a.quick, timed)
            per_seed.setdefault(str(seed), {}).update(entries)
            runs.update(seed_runs)
            # rewritten after every seed: an interrupted invocation keeps what it measured
            payload = write(per_seed, runs, history, info, a.quick, command)
        if timed:
            history.append(time_invocation(timed, a.batch, news, rounds, command, info))
            payload = write(per_seed, runs, history, info, a.quick, command)
    if payload is None:
        payload = write(per_seed, runs, history, info, a.quick, command)
    return payload


# -- the runs --------------------------------------------------------------------------------------------------
def results_name(quick: bool) -> str:
    return "efficiency_quick" if quick else "efficiency"


def results_path(quick: bool) -> Path:
    return common.RESULTS / f"{results_name(quick)}.json"


def recorded_results(quick: bool) -> dict:
    path = results_path(quick)
    return json.loads(path.read_text()) if path.exists() else {}


def variant_names(sizes) -> list[str]:
    return ["teacher", *[f"student_l{n}" for n in sorted(sizes)]]


def size_of(variant: str) -> int:
    """The student size of the run a model comes from (the teacher: the base run's)."""
    return quality.PIPELINE_LAYERS if variant == "teacher" else int(variant.removeprefix("student_l"))


def student_switch(n: int) -> list[str]:
    return [f"distill.student_layers={n}"]


def run_overrides(seed: int, n: int, quick: bool) -> list[str]:
    """What the run of student size ``n`` must have run (quality.same_settings): the base run's settings for the
    pipeline's own size, quality.student_run's for the others."""
    if n == quality.PIPELINE_LAYERS:
        return quality.base_overrides(seed, quick)
    return ["stage=pipeline", f"train.seed={seed}", *student_switch(n), *(quality.QUICK if quick else [])]


def recorded_measurements(saved: dict, quick: bool) -> dict:
    """{seed: {variant: entry}} of a results file, the models whose run ran the settings this code would run;
    the others are named and left out."""
    out: dict = {}
    for seed, by_variant in saved.get("per_seed", {}).items():
        for variant, entry in by_variant.items():
            run = saved.get("runs", {}).get(entry["run"])
            if run is not None and quality.same_settings(run, run_overrides(int(seed), size_of(variant), quick)):
                out.setdefault(seed, {})[variant] = entry
            else:
                print(f"seed {seed}: the recorded {variant} ({entry['run']}) ran other settings than today's: left "
                      "out", flush=True)
    return out


def obtain_run(root: Path, seed: int, n: int, quick: bool) -> tuple[str, Path, dict]:
    """(run name, folder, quality's record) of seed ``seed``'s run of student size ``n``, kept in ``root`` or trained
    now: the base run for the pipeline's own size; for another size, quality's ``seed_S_lN`` where it is kept,
    else ``eff_lN_seed_S`` (student_run: the base run's teachers linked, only Stage I and II train)."""
    if n == quality.PIPELINE_LAYERS:
        run_dir, run = quality.seed_base_run(root, seed, quick)
        return quality.base_name(seed), run_dir, run
    kept = f"seed_{seed}_l{n}"
    if (root / kept / "quality_run.json").exists():
        return kept, root / kept, quality.obtain(root, kept, quality.pipeline_overrides(seed, n, quick), None)
    name = f"eff_l{n}_seed_{seed}"
    # no record passed as committed: a record without its folder has no model files to evaluate
    return name, root / name, quality.student_run(root, name, seed, quick, student_switch(n))


def best_teacher(summary: dict) -> str:
    """The post-trained teacher with the best dev AUC of its run (the plain one and the ensemble are baselines)."""
    teachers = {k: m for k, m in summary["models"].items() if k.startswith("teacher_") and m.get("auc") is not None}
    return max(teachers, key=lambda k: teachers[k]["auc"])


def model_name(variant: str, run: dict) -> str:
    """The model's name in its run's table."""
    return best_teacher(run["summary"]) if variant == "teacher" else "student"


def load_models(run_dir: Path, run: dict, variants: list[str]) -> tuple[object, dict]:
    """(the run's context, {variant: model}) loaded from its model files ("teacher" and/or its student)."""
    from speedyrec.build import build_context
    from speedyrec.config import load_config
    from speedyrec.distill.teachers import load_finetuned_recommender
    from speedyrec.engine.distributed import DistInfo

    ctx = build_context(load_config(str(run_dir / "config.yaml"), [f"out_dir={run_dir}"]), DistInfo())
    models = {}
    for variant in variants:
        if variant == "teacher":
            path = run_dir / "finetune_teachers" / "teachers" / f"{model_name(variant, run)}.safetensors"
            models[variant] = load_finetuned_recommender(ctx, path)[0]
        else:
            assert ctx.cfg.distill.student_layers == size_of(variant), (run_dir, variant)
            models[variant] = load_finetuned_recommender(ctx, run_dir / "distill_finetune" / "student.safetensors",
                                                         ctx.cfg.distill.student_layers)[0]
    return ctx, models


# -- measuring -------------------------------------------------------------------------------------------------
def precisions_here() -> dict:
    """The precisions this machine runs, and how bf16 and int8 run here."""
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.engine.precision import native_bf16
    from speedyrec.models.inference import cpu_has_vnni

    bf16 = native_bf16(DistInfo().device)
    bits = 8 if cpu_has_vnni() else 7
    return {"precisions": [p for p in PRECISIONS if p != "bf16" or bf16], "bf16_native": bf16 or None,
            "int8_path": f"torch.ao.quantization.quantize_dynamic (int8 weights per output channel, activations "
                         f"quantised per batch on {bits} bits, int32 accumulation)"}


def evaluate_precisions(ctx, model, precisions: list[str]) -> dict:
    """{precision: dev metrics} of one model through the project's evaluation, at each precision."""
    from speedyrec.build import segments_of
    from speedyrec.engine import runlog
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.eval.evaluate import evaluate_models
    from speedyrec.models.inference import inference_model, quantized_linears
    from speedyrec.models.news_inputs import NewsInputs

    runlog.QUIET = True
    cfg, inputs, out = ctx.cfg, NewsInputs(ctx.store, segments_of(ctx.cfg)), {}
    for precision in precisions:
        served, amp = inference_model(model, precision)
        if precision == "int8":
            assert quantized_linears(served) > 0, "int8: no linear map was quantised"
        out[precision] = evaluate_models([served], inputs, ctx.data.dev, DistInfo(), max_history=cfg.data.max_history,
                                         batch_size=cfg.eval.batch_size, max_impressions=cfg.eval.max_impressions,
                                         amp=amp)[0]
    return out


def measure_seed(root: Path, seed: int, variants: list[str], quick: bool, timed: dict) -> tuple[dict, dict]:
    """Seed ``seed``'s ``variants`` evaluated on dev at every precision here, their runs obtained first (obtain_run).
    Returns ({variant: entry}, {run name: quality's record}); a model of a variant ``timed`` has none of yet is
    added to it, for this invocation's timing."""
    from speedyrec.models.inference import parameter_counts

    here = precisions_here()
    entries, runs = {}, {}
    by_size: dict = {}
    for variant in variants:
        by_size.setdefault(size_of(variant), []).append(variant)
    for n, names in sorted(by_size.items()):
        name, run_dir, run = obtain_run(root, seed, n, quick)
        bank_seconds_of(run, run_dir)
        runs[name] = run
        ctx, models = load_models(run_dir, run, names)
        for variant, model in models.items():
            print(f"seed {seed}: dev AUC of {variant} at {', '.join(here['precisions'])}", flush=True)
            own = model_name(variant, run)
            entries[variant] = {
                "run": name, "model": own, "layers": len(model.news_encoder.backbone.layers),
                "params": parameter_counts(model), "metrics": evaluate_precisions(ctx, model, here["precisions"]),
                "auc_recorded_by_the_run": run["summary"]["models"][own]["auc"],
                "commit": source_commit(), "date": _now(), "bf16_native": here["bf16_native"],
                "int8_path": here["int8_path"]}
            timed.setdefault(variant, (seed, model, ctx))
    return entries, runs


def time_models(timed: dict, precisions: list[str], batch: int, news: int, rounds: int) -> dict:
    """{variant: {precision: {"median", "blocks"}}}: news encoded per second of each model at each precision, one
    warm-up block each, then ``rounds`` interleaved rounds of one block per variant."""
    import numpy as np
    import torch

    from speedyrec.build import segments_of
    from speedyrec.engine import runlog
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.eval.evaluate import encode_news
    from speedyrec.models.inference import inference_model
    from speedyrec.models.news_inputs import NewsInputs

    runlog.QUIET = True  # no progress bars inside timed blocks
    dist, variants = DistInfo(), {}
    for variant, (_, model, ctx) in timed.items():
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(ctx.store.num_news, size=min(news, ctx.store.num_news), replace=False))
        inputs = NewsInputs(ctx.store, segments_of(ctx.cfg))
        for precision in precisions:
            variants[(variant, precision)] = (inference_model(model, precision), inputs, sample)
    times = {k: [] for k in variants}
    with torch.inference_mode():
        def block(key):
            (served, amp), inputs, sample = variants[key]
            t0 = time.perf_counter()
            encode_news(served, inputs, sample, dist, batch, amp)
            return len(sample) / (time.perf_counter() - t0)

        print(f"timing {len(variants)} variants: 1 warm-up and {rounds} rounds of {news} news each", flush=True)
        for key in variants:
            block(key)
        for _ in range(rounds):
            for key in variants:  # interleaved: a busy moment of the machine falls on every variant alike
                times[key].append(block(key))
    out: dict = {}
    for (variant, precision), values in times.items():
        out.setdefault(variant, {})[precision] = {"median": statistics.median(values), "blocks": values}
    return out


def time_invocation(timed: dict, batch: int, news: int, rounds: int, command: str, info: dict) -> dict:
    """This invocation's entry of the speed history: every model it evaluated timed at every precision here."""
    import torch

    from speedyrec.models.inference import parameter_counts

    here = precisions_here()
    before = _load_average()
    news_per_s = time_models(timed, here["precisions"], batch, news, rounds)
    complete = all(set(here["precisions"]) <= set(news_per_s.get(v, {})) for v in variant_names(FULL_SIZES))
    return {"date": _now(), "commit": info.get("commit"), "command": command, "device": info.get("device"),
            "torch": info.get("torch"), "threads": torch.get_num_threads(), "load_average_before": before,
            "load_average_after": _load_average(), "batch": batch, "news_timed": news, "rounds": rounds, **here,
            "models_of_seed": {v: seed for v, (seed, _, _) in timed.items()}, "complete": complete,
            "params": {v: {**parameter_counts(model), "layers": len(model.news_encoder.backbone.layers)}
                       for v, (_, model, _) in timed.items()},
            "news_per_s": news_per_s}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None



# -- the tables ------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def speed_index(history: list[dict]) -> int | None:
    """The speed history's entry the tables read: the latest complete one (every model, every precision the
    machine runs), else the latest; None when nothing was timed yet."""
    complete = [i for i, s in enumerate(history) if s.get("complete")]
    return complete[-1] if complete else (len(history) - 1 if history else None)


def summarize(per_seed: dict, runs: dict, speed: dict | None) -> dict:
    """The results file's tables from the recorded models (``per_seed``: seed -> variant -> entry; ``runs``: their
    runs' records) and one invocation's timing (``speed``, a speed_history entry, or None): ``rows`` (the teacher,
    then the students by size) with ``layers``, ``params``, ``news_per_s`` and ``auc`` ({fp32, bf16, int8}: the
    median speed of that invocation; the mean dev AUC over the recorded seeds; None where not measured), each seed's
    AUC (``auc_per_seed``), the stage times, the goal and the paper's numbers."""
    speeds = (speed or {}).get("news_per_s", {})
    timed_params = (speed or {}).get("params", {})
    variants = {v for by in per_seed.values() for v in by} | set(speeds)
    sizes = sorted(size_of(v) for v in variants if v != "teacher")
    teacher_speed = ((speeds.get("teacher") or {}).get("fp32") or {}).get("median")
    rows = []
    for variant in variant_names(sizes):
        entries = {int(s): by[variant] for s, by in sorted(per_seed.items(), key=lambda kv: int(kv[0]))
                   if variant in by}
        if not entries and variant not in speeds:
            continue
        par = {**entries[max(entries)]["params"], "layers": entries[max(entries)]["layers"]} if entries else \
            timed_params[variant]
        news = {p: ((speeds.get(variant) or {}).get(p) or {}).get("median") for p in PRECISIONS}
        auc = {p: {s: e["metrics"][p]["auc"] for s, e in entries.items() if p in e["metrics"]} for p in PRECISIONS}
        fp32 = auc["fp32"]
        drop = {p: [100 * (auc[p][s] - fp32[s]) for s in auc[p] if s in fp32] for p in PRECISIONS}
        rows.append({
            "model": "teacher" if variant == "teacher" else "student", "layers": par["layers"],
            "params": par["total"], "params_without_embeddings": par["without_embeddings"],
            "embeddings": par["embeddings"],
            "news_per_s": news,
            "speedup_vs_teacher_fp32": {p: (v / teacher_speed if v and teacher_speed else None) for p, v in news.items()},
            "auc": {p: (_mean_std(list(v.values()))[0] if v else None) for p, v in auc.items()},
            "auc_std": {p: (_mean_std(list(v.values()))[1] if v else None) for p, v in auc.items()},
            "auc_per_seed": auc,
            "auc_minus_fp32_points": {p: (_mean_std(d) if d else None) for p, d in drop.items()},
            "auc_recorded_by_the_run": {s: e["auc_recorded_by_the_run"] for s, e in entries.items()},
            "seeds": sorted(entries)})
    teacher = next((r for r in rows if r["model"] == "teacher"), None)
    for r in rows:
        r["fewer_params_than_teacher"] = 1 - r["params"] / teacher["params"] if teacher else None
        r["fewer_params_without_embeddings"] = (1 - r["params_without_embeddings"] / teacher["params_without_embeddings"]
                                                if teacher else None)
        r["best_precision"] = best_precision(r)
    return {"rows": rows, "stage_seconds": stage_times(per_seed, runs, sizes),
            "seeds": sorted(int(s) for s in per_seed), "layers": sizes,
            "goal": {"student_layers": quality.PIPELINE_LAYERS, "speedup": GOAL_SPEEDUP,
                     "auc_points": GOAL_AUC_POINTS},
            "paper": {"speedup": PAPER_SPEEDUP, "fewer_params": PAPER_FEWER_PARAMS, "params_m": PAPER_PARAMS_M,
                      "hours": PAPER_HOURS}}


def best_precision(row: dict) -> str:
    """The fastest precision timed whose mean dev AUC is within GOAL_AUC_POINTS of the model's fp32 AUC (fp32
    when none is, or when a precision's AUC was not measured)."""
    drop = row["auc_minus_fp32_points"]
    ok = [p for p in PRECISIONS if row["news_per_s"].get(p) and (
        p == "fp32" or (drop.get(p) and abs(drop[p][0]) <= GOAL_AUC_POINTS))]
    return max(ok, key=lambda p: row["news_per_s"][p]) if ok else "fp32"


def bank_seconds_of(run: dict, run_dir: Path) -> dict:
    """{step: seconds} a run's steps spent building the teachers' banks (stats.json ``bank_seconds``), kept in
    ``run`` so that its record says them once the folder is gone. The seed's base run builds the banks; the runs
    that link its teachers read them from the cache and spend ~0 s: A.4 counts each step without them."""
    for step, _, _ in STEPS:
        stats = run_dir / step / "stats.json"
        if stats.exists():  # a step without the key built no bank
            run.setdefault("bank_seconds", {})[step] = json.loads(stats.read_text()).get("bank_seconds", 0.0)
    return run.get("bank_seconds", {})


def stage_times(per_seed: dict, runs: dict, sizes: list[int]) -> dict:
    """{step: {"teacher" or student layers: {"mean", "std", "median", "min", "max", "seeds", "bank_unknown"}}} of
    wall seconds over the recorded seeds, the building of the teachers' banks taken out where the run recorded it
    (``bank_unknown``: the seeds whose run did not, counted whole); ``banks``: {step: the same without
    "bank_unknown"}, the banks' own seconds,
    built once per seed. The teacher's steps come from the run of the seed's teacher (its base run), each student's
    from its own run; a step no run of a column trained (a linked one, a baseline not run) is absent."""
    out: dict = {}
    banks: dict = {}
    for step, _, who in STEPS:
        for col in (["teacher"] if who == "teacher" else sizes):
            variant = "teacher" if col == "teacher" else f"student_l{col}"
            values, unknown = [], 0
            for by in per_seed.values():
                run = (runs.get(by[variant]["run"]) or {}) if variant in by else {}
                seconds = run.get("summary", {}).get("seconds", {})
                if step in seconds:
                    bank = run.get("bank_seconds", {}).get(step)
                    unknown += bank is None
                    values.append(seconds[step] - (bank or 0.0))
                    if bank is not None and bank > 1.0:  # the run that built them (the others read: ~0 s)
                        banks.setdefault(step, {})[by[variant]["run"]] = bank
            if values:
                out.setdefault(step, {})[str(col)] = {**_spread(values), "bank_unknown": unknown}
    if banks:
        out["banks"] = {step: _spread(list(v.values())) for step, v in banks.items()}
    return out


def _spread(values: list[float]) -> dict:
    """Wall seconds over seeds: mean and std, and the median with the range that A.4's table shows (a run that shared
    the cores only adds time: one such seed moves the mean, not the median)."""
    mean, std = _mean_std(values)
    return {"mean": mean, "std": std, "median": statistics.median(values), "min": min(values), "max": max(values),
            "seeds": len(values)}


def _seconds_cell(v: dict) -> str:
    """A.4's cell (``_spread``'s): the median over seeds and, with more than one, the range."""
    return f"{v['median']:.0f}" + (f" ({v['min']:.0f}-{v['max']:.0f})" if v["seeds"] > 1 else "")


def verdict(d: dict) -> list[str]:
    """Sentences generated from the numbers: the goal, then the paper's claims."""
    rows = {r["layers"]: r for r in d["rows"] if r["model"] == "student"}
    teacher = next((r for r in d["rows"] if r["model"] == "teacher"), None)
    speed = d.get("speed")
    lines = []
    goal = d["goal"]
    s = rows.get(goal["student_layers"])
    x = s["speedup_vs_teacher_fp32"][s["best_precision"]] if s else None
    if x is None or not s["seeds"]:
        lines.append(f"Goal not judged: the {goal['student_layers']}-layer student and the fp32 teacher have not "
                     "both been timed by one invocation and evaluated.")
    else:
        p = s["best_precision"]
        drop = s["auc_minus_fp32_points"].get(p)
        drop_text = "" if p == "fp32" or not drop else f", AUC {drop[0]:+.2f} points against its fp32 self"
        met = x >= goal["speedup"] and (p == "fp32" or (drop and abs(drop[0]) <= goal["auc_points"]))
        lines.append(f"Goal {'met' if met else 'not met'}: the {goal['student_layers']}-layer student at its best "
                     f"precision ({p}{drop_text}) encodes {x:.1f}x the news per second of the fp32 teacher "
                     f"(goal ≥ {goal['speedup']:.0f}x, AUC within {goal['auc_points']} points). Speed: the "
                     f"invocation of {speed['date']} (commit {speed['commit']}); AUC: mean over seed(s) "
                     f"{', '.join(map(str, s['seeds']))}.")
        fastest = max((q for q in PRECISIONS if s["news_per_s"].get(q)), key=lambda q: s["news_per_s"][q])
        if fastest != p:
            fd = s["auc_minus_fp32_points"].get(fastest)
            lines.append(f"Its fastest precision, {fastest} ({s['speedup_vs_teacher_fp32'][fastest]:.1f}x), costs "
                         f"{fd[0]:+.2f} AUC points, past the {goal['auc_points']}-point bar." if fd else
                         f"Its fastest precision is {fastest} ({s['speedup_vs_teacher_fp32'][fastest]:.1f}x), "
                         "whose AUC was not measured.")
    lo, hi = d["paper"]["speedup"]
    fp32 = {n: r["speedup_vs_teacher_fp32"]["fp32"] for n, r in sorted(rows.items())
            if r["speedup_vs_teacher_fp32"]["fp32"]}
    best = {n: r["speedup_vs_teacher_fp32"][r["best_precision"]] for n, r in sorted(rows.items()) if n in fp32}
    if fp32 and teacher:
        inside = all(lo <= v <= hi for v in fp32.values())
        lines.append(f"Paper (Figure 5): students {lo:.0f}-{hi:.0f}x faster than the teacher (theirs has 12 layers, "
                     f"ours {teacher['layers']}). Here at fp32: "
                     + ", ".join(f"{_layers(n)} {v:.1f}x" for n, v in fp32.items())
                     + (" (within that range)" if inside else " (not all within it)") + "; at each one's best "
                     "precision: " + ", ".join(f"{_layers(n)} {v:.1f}x" for n, v in best.items()) + ".")
    if teacher and rows:
        plo, phi = d["paper"]["fewer_params"]
        fewer = {n: r["fewer_params_than_teacher"] for n, r in sorted(rows.items())}
        fewer_x = {n: r["fewer_params_without_embeddings"] for n, r in sorted(rows.items())}
        lines.append(f"Paper: {100 * plo:.0f}-{100 * phi:.0f}% fewer parameters (embeddings counted, 12-layer "
                     "teacher). Here, embeddings counted: "
                     + ", ".join(f"{_layers(n)} {100 * v:.0f}%" for n, v in fewer.items())
                     + ("" if all(plo <= v <= phi for v in fewer.values()) else " (not all within that range: "
                        f"the embeddings, {100 * teacher['embeddings'] / teacher['params']:.0f}% of the teacher, "
                        "stay whole)")
                     + "; without embeddings: "
                     + ", ".join(f"{_layers(n)} {100 * v:.0f}%" for n, v in fewer_x.items()) + ".")
    few = [r for r in d["rows"] if len(r["seeds"]) < 3]
    if few:
        lines.append("Fewer than 3 seeds for " + ", ".join(
            "the teacher" if r["model"] == "teacher" else f"the {r['layers']}-layer student" for r in few)
            + ": the AUC differences are provisional.")
    return lines


def _layers(n: int) -> str:
    return f"{n} layer{'s' if n != 1 else ''}"


def _auc_cell(r: dict, p: str) -> str:
    v = r["auc"].get(p)
    if v is None:
        return "n/a"
    spread = f" ± {100 * r['auc_std'][p]:.2f}" if len(r["seeds"]) > 1 else ""
    drop = r["auc_minus_fp32_points"].get(p)
    return f"{100 * v:.2f}{spread}" + (f" ({drop[0]:+.2f})" if p != "fp32" and drop else "")


def figure_table(d: dict) -> str:
    """Figure 5's numbers, one row per model."""
    rows = []
    for r in d["rows"]:
        name = "teacher" if r["model"] == "teacher" else "Tiny-NewsRec student"
        ratio = r["speedup_vs_teacher_fp32"]
        speeds = [(f"{v:,.0f}" + (f" ({ratio[p]:.1f}x)" if ratio[p] else "")) if v else "n/a"
                  for p, v in r["news_per_s"].items()]
        fewer = r["fewer_params_than_teacher"]
        rows.append([name, r["layers"], f"{r['params'] / 1e6:.2f}M", f"{r['params_without_embeddings'] / 1e6:.2f}M",
                     "" if r["model"] == "teacher" or fewer is None else f"{100 * fewer:.0f}%", *speeds,
                     *[_auc_cell(r, p) for p in PRECISIONS], r["best_precision"], len(r["seeds"])])
    return md_table(["model", "layers", "params", "params w/o embeddings", "fewer params", "news/s fp32 (x teacher)",
                     "news/s bf16", "news/s int8", "AUC fp32", "AUC bf16 (Δ points)", "AUC int8 (Δ points)",
                     "best precision", "seeds"], rows)


def stage_table(d: dict) -> str:
    """A.4: each step's wall time per model size, beside the paper's hours."""
    sizes = sorted(d["layers"], reverse=True)
    st = d["stage_seconds"]
    rows = []
    paper_of = {"posttrain": "posttrain", "distill_posttrain": "posttrain", "finetune_teachers": "finetune",
                "distill_finetune": "finetune"}
    for step, what, who in STEPS:
        if step not in st:
            continue
        cols = ["teacher"] if who == "teacher" else [str(n) for n in sizes]
        cells = []
        for col in ["teacher", *[str(n) for n in sizes]]:
            v = st[step].get(col) if col in cols else None
            cells.append("" if v is None else _seconds_cell(v))
        paper = d["paper"]["hours"].get(paper_of.get(step, ""), {})
        hours = ", ".join(f"{paper[k if k == 'teacher' else int(k)]} h" for k in (cols if paper else [])
                          if (k if k == "teacher" else int(k)) in paper)
        unknown = sum(v.get("bank_unknown", 0) for v in st[step].values())
        rows.append([what + (f" ({unknown} of its cells' seeds with the banks' building inside: its run did not "
                             "record it)" if unknown else ""), *cells, hours])
    for step, v in st.get("banks", {}).items():
        cell = _seconds_cell(v)
        rows.append([f"the teachers' banks for {dict((s, w) for s, w, _ in STEPS)[step].split(':')[0]} (built once "
                     "per seed by the base run, read by the runs that link its teachers; not in the rows above)",
                     cell, *[""] * len(sizes), ""])
    return md_table(["step", f"teacher ({TEACHER_LAYERS} layers)", *[f"{n}-layer student" for n in sizes],
                     "paper A.4 (12-layer teacher; 4, 2, 1-layer students)"], rows)


def seed_table(d: dict) -> str:
    """Each recorded model's dev AUC at each precision, per seed, with the run and commit it comes from."""
    rows = []
    for seed, by in sorted(d["per_seed"].items(), key=lambda kv: int(kv[0])):
        for variant in variant_names(d["layers"]):
            e = by.get(variant)
            if e is not None:
                rows.append([seed, variant, f"`{e['run']}` ({e['model']})",
                             *[f"{100 * e['metrics'][p]['auc']:.2f}" if p in e["metrics"] else "n/a"
                               for p in PRECISIONS], e["commit"], e["date"]])
    return md_table(["seed", "model", "run (its model)", "AUC fp32", "AUC bf16", "AUC int8", "measured at commit",
                     "on"], rows)


def history_table(d: dict) -> str:
    """Every invocation's timing: the teacher's fp32 news/s and the 2-layer student's ratios to it."""
    rows = []
    chosen = d.get("speed_index")
    for i, s in enumerate(d["speed_history"]):
        n = s["news_per_s"]
        teacher = ((n.get("teacher") or {}).get("fp32") or {}).get("median")
        student = n.get(f"student_l{quality.PIPELINE_LAYERS}") or {}
        load = s.get("load_average_before")
        rows.append([s["date"] + (" (the table)" if i == chosen else ""), s["commit"], s["threads"],
                     f"{load[0]:.1f}" if load else "n/a", "yes" if s["complete"] else "no",
                     f"{teacher:,.0f}" if teacher else "n/a",
                     *[f"{student[p]['median'] / teacher:.1f}x" if teacher and p in student else "n/a"
                       for p in PRECISIONS]])
    return md_table(["invocation", "commit", "threads", "load average (1 min, before timing)",
                     "every model and precision", "teacher fp32 news/s",
                     *[f"{quality.PIPELINE_LAYERS}-layer student {p} (x teacher fp32)" for p in PRECISIONS]], rows)


def report(d: dict) -> str:
    m, sp = d["machine"], d["speed"]
    # read back from a results file, what it recorded; in the run that writes it, the time so far
    took = m.get("seconds", m.get("invocation_seconds", time.time() - m.get("started", time.time())))
    lines = ["# Efficiency: Tiny-NewsRec's Figure 5 and A.4\n",
             f"Written by `{d['command']}` at commit {m.get('commit', '?')} on {m['device']}, torch {m['torch']}"
             f"{' (quick settings: tiny random encoders)' if d['quick'] else ''}; {took / 60:.1f} min"
             + (f" ({d['kept_runs_reused']} kept training runs reused, their time not counted)"
                if d.get("kept_runs_reused") else "") + ". Models and seeds recorded across invocations: "
             "the AUCs of every recorded seed, the speed of one invocation.\n"]
    if sp is None:
        lines.append("News encoded per second: no invocation has timed the models yet.\n")
    else:
        load = sp.get("load_average_before"), sp.get("load_average_after")
        lines.append(
            f"News encoded per second: timed by `{sp['command']}` on {sp['date']} at commit {sp['commit']}, "
            f"{sp['device']}, torch {sp['torch']}, {sp['threads']} threads, load average "
            + (f"{load[0][0]:.1f} before timing and {load[1][0]:.1f} after" if all(load) else "not known")
            + ("" if sp["complete"] else "; not every model and precision: no invocation has timed them all yet")
            + f"; the models of seed(s) {', '.join(map(str, sorted(set(sp['models_of_seed'].values()))))}. The news "
            f"encoder at each precision through the export's path (length-sorted batches of {sp['batch']} titles "
            f"from the token store, float32 vectors out), {sp['news_timed']} news per block, 1 warm-up and the "
            f"median of {sp['rounds']} interleaved blocks per variant, in inference mode; ratios against the fp32 "
            "teacher of that invocation. bf16: "
            + (f"native ({sp['bf16_native']})" if sp["bf16_native"] else "not measured (no native bf16 there)")
            + f". int8: {sp['int8_path']} of the transformer layers' linear maps.\n")
    lines += [f"Dev AUC (x100) through the project's evaluation at each precision (user encoder in bf16 autocast "
              f"for bf16, float32 for int8), mean ± std over the recorded seeds "
              f"({', '.join(map(str, d['seeds'])) or 'none'}), paired difference to fp32 in brackets. Parameters of "
              "the whole recommender (news and user encoder).\n",
              figure_table(d),
              "\nWall time of each pipeline step (s, median over seeds and their range) per model size, beside the "
              "paper's (A.4); "
              "the students of other sizes link their seed's teachers, so only their own steps are theirs:\n",
              stage_table(d),
              "\n" + ("Quick settings (tiny random encoders, 2 timed blocks): these numbers check the harness, not "
                      "the paper's claims or the goal.\n\n" if d["quick"] else "")
              + "\n".join(f"- {v}" for v in d["verdict"]) + "\n",
              "\n## Each seed\n", seed_table(d)]
    if d["speed_history"]:
        lines += ["\n## Every invocation's timing\n",
                  "How stable the speed is: each invocation that timed models, the table's marked (the latest that "
                  "timed every model and precision).\n", history_table(d)]
    return "\n".join(lines)


def write(per_seed: dict, runs: dict, history: list[dict], info: dict, quick: bool, command: str) -> dict:
    """The results file and its md from the recorded models, their runs and the speed history."""
    per_seed = {s: per_seed[s] for s in sorted(per_seed, key=int)}
    runs = {name: runs[name] for name in sorted({e["run"] for by in per_seed.values() for e in by.values()})}
    index = speed_index(history)
    speed = None if index is None else history[index]
    payload = summarize(per_seed, runs, speed)
    payload.update(per_seed=per_seed, runs=runs, speed=speed, speed_index=index, speed_history=history, machine=info,
                   quick=quick, command=command, kept_runs_reused=len(common._REUSED))
    payload["verdict"] = verdict(payload)
    md = report(payload)
    write_results(results_name(quick), payload, md, lambda path: plot(path, payload))
    print(md)
    return payload


def plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    rows = d["rows"]
    if not rows:
        return
    labels = [f"{'teacher' if r['model'] == 'teacher' else 'student'}\n{_layers(r['layers'])}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.bar(range(len(rows)), [r["params"] / 1e6 for r in rows], color="#8c8c8c", label="embeddings included")
    a.bar(range(len(rows)), [r["params_without_embeddings"] / 1e6 for r in rows], color="#4c72b0",
          label="without embeddings")
    a.set_xticks(range(len(rows)))
    a.set_xticklabels(labels, fontsize=8)
    a.set_ylabel("parameters (millions)")
    a.legend(fontsize=8)
    width = 0.8 / len(PRECISIONS)
    for k, (p, color) in enumerate(zip(PRECISIONS, ("#4c72b0", "#dd8452", "#55a868"))):
        values = [r["news_per_s"].get(p) or 0 for r in rows]
        b.bar([i + (k - 1) * width for i in range(len(rows))], values, width, color=color, label=p)
    b.set_xticks(range(len(rows)))
    b.set_xticklabels(labels, fontsize=8)
    b.set_ylabel("news encoded per second")
    b.legend(fontsize=8)
    fig.suptitle("Model size and inference speed (Tiny-NewsRec Figure 5)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
