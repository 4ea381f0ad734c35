"""Tiny-NewsRec's Figure 5 and A.4 on our models: size, news encoded per second at fp32, bf16 and int8 with the
dev AUC each precision keeps, and the wall time of every pipeline step per student size.

``python -m benchmarks.efficiency [--quick] [--seeds 0,1,2] [--layers 1,2,4] [--out DIR] [--kept-only]``

The models are benchmarks.quality's: for each seed, ``--out DIR/seed_S`` (the pipeline with its M teachers and the
2-layer student) and ``seed_S_l1``, ``seed_S_l4`` (students of other sizes, linking that seed's teachers). Runs kept
there are reused, so ``python -m benchmarks.quality --out DIR`` followed by this with the same ``--out`` trains
nothing again; runs missing are trained as quality trains them (about 7 hours for 3 seeds here). With the runs
kept, about 15 minutes here: 36 dev evaluations (4 models, 3 precisions, 3 seeds) and 12 variants x 8 timed blocks.

- Models: the Tiny-NewsRec student of each size (Stage II's ``student.safetensors``) and the teacher: the run's
  best post-trained, finetuned 6-layer teacher by its dev AUC (PLM-NR DP, ``finetune_teachers/teachers/``).
  Each is loaded as Stage II loads teachers (``load_finetuned_recommender``: rebuilt on the PLM, checksum verified).
- Precisions (``speedyrec.models.inference.inference_model``, one function for speed and AUC): fp32; bf16 (the
  transformer's weights in bf16 under bf16 autocast), where the CPU computes bf16 natively; int8 (torch.ao dynamic
  quantisation of the transformer layers' linear maps; embeddings, attention, poolings and the user encoder in
  float32).
- Speed: news encoded per second through the export's and evaluation's path (``encode_news``: token rows from the
  store, length-sorted batches of ``--batch`` news, the news encoder, float32 vectors out), on a fixed sample of
  the news table's titles (``data.title_tokens`` tokens at most, as trained), in inference mode, with every core's
  thread. Each variant is warmed up by one block; then ``--rounds`` rounds time one block per variant in turn
  (interleaved, so a busy moment of the machine falls on all alike) and the median is kept. Ratios are against
  the fp32 teacher of the same invocation. Parameters are counted on the float model, embeddings included (as
  the paper's Table 3 counts model size) and excluded.
- AUC: each seed's models evaluated on dev at each precision through the project's evaluation
  (``evaluate_models``; the news encoder at that precision, the user encoder under the same autocast for bf16
  and in float32 for int8); mean ± std over seeds, and the paired difference to the same model at fp32.
- Why torch.ao for int8: it quantises the project's own modules in place, so speed and AUC run the same code
  as fp32 (our attention kernels, ``encode_news``, ``evaluate_models``), with no second runtime and no graph export
  of the backbone. ONNX Runtime's dynamic quantisation was tried on the 2-layer MiniLM student: its int8 vectors
  were closer to fp32 (3.4% of a vector's norm at worst, against 10% here with 8-bit activations, 20% with torch's
  default 7), at a similar speed on this busy machine, but it needs the news encoder exported per model, the
  poolings kept out of its quantiser by hand (it quantises their matrix-vector products into a kernel that
  refuses them), and a second encoding path for the AUC. torch.ao's eager quantisation is deprecated in favour of
  torchao, whose int8 path on CPUs is fast under torch.compile; it still runs on the torch this project pins.
- Stage times: each step's wall time from the runs' ``pipeline.md`` summary (``metrics.json`` seconds), mean over
  seeds, beside the paper's A.4 hours.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import common, quality
from benchmarks.common import machine, md_table, write_results

PRECISIONS = ("fp32", "bf16", "int8")
TEACHER_LAYERS = quality.PLM_LAYERS
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
         ("student_plain", "baseline: the student finetuned alone", "student"),
         ("newsbert", "baseline: NewsBERT (teacher and student jointly)", "student"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.efficiency", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="quality's quick pipelines (tiny random encoders)")
    p.add_argument("--seeds", default=None, help="default 0,1,2 (--quick: 0)")
    p.add_argument("--layers", default="1,2,4", help="student sizes")
    p.add_argument("--out", default="", help="quality's runs are kept (or found) here (default: a temporary folder)")
    p.add_argument("--kept-only", action="store_true", help="train nothing: measure the runs kept in --out")
    p.add_argument("--batch", type=int, default=256, help="news per encoder call (a server's batch)")
    p.add_argument("--news", type=int, default=0, help="news per timed block (default 2048; quick 512)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds per variant (default 7; quick 2)")
    a = p.parse_args(argv)
    info = machine()
    seeds = quality.seed_list(a.seeds, a.quick)
    sizes = sorted({int(n) for n in a.layers.split(",")})
    news, rounds = a.news or (512 if a.quick else 2048), a.rounds or (2 if a.quick else 7)
    command = "python -m benchmarks.efficiency " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp).resolve()
        runs = {seed: seed_runs(root, seed, sizes, a.quick, may_run=not a.kept_only) for seed in seeds}
        runs = {seed: r for seed, r in runs.items() if r}
        if not runs:
            raise SystemExit(f"benchmarks.efficiency: no run of seeds {seeds} is kept in {root}")
        measured = measure(runs, sizes, a.batch, news, rounds)
    payload = summarize(measured, runs, sizes)
    payload.update(machine=info, quick=a.quick, command=command, batch=a.batch, news_timed=news, rounds=rounds,
                   kept_runs_reused=len(common._REUSED))
    md = report(payload)
    write_results("efficiency_quick" if a.quick else "efficiency", payload, md, lambda path: plot(path, payload))
    print(md)
    return payload


# -- the runs --------------------------------------------------------------------------------------------------
def seed_runs(root: Path, seed: int, sizes: list[int], quick: bool, may_run: bool) -> dict:
    """{student layers: (run dir, quality's run record)} of one seed: the base pipeline (teachers and the 2-layer
    student) and one run per other size linking its teachers, kept in ``root`` as benchmarks.quality keeps them
    (run here when missing and ``may_run``); {} when the base run is neither kept nor may run."""
    base = quality.seed_base_run(root, seed, quick, may_run=may_run)
    if base is None:
        return {}
    out = {quality.PIPELINE_LAYERS: base}
    for n in sizes:
        if n == quality.PIPELINE_LAYERS:
            continue
        src = quality.teachers_of(root, seed)
        name = f"seed_{seed}_l{n}"
        run = quality.obtain(root, name, quality.pipeline_overrides(seed, n, quick), None,
                             [f"pipeline.teachers_from={src}"] if src else [], may_run=may_run)
        if run is not None:
            out[n] = (root / name, run)
    return out


def best_teacher(summary: dict) -> str:
    """The post-trained teacher with the best dev AUC of its run (the plain one and the ensemble are baselines)."""
    teachers = {k: m for k, m in summary["models"].items() if k.startswith("teacher_") and m.get("auc") is not None}
    return max(teachers, key=lambda k: teachers[k]["auc"])


def load_models(run_dir: Path, run: dict, teacher: bool) -> tuple[object, dict]:
    """(the run's context, {"student": model[, "teacher": model]}) loaded from its model files."""
    from speedyrec.build import build_context
    from speedyrec.config import load_config
    from speedyrec.distill.teachers import load_finetuned_recommender
    from speedyrec.engine.distributed import DistInfo

    ctx = build_context(load_config(str(run_dir / "config.yaml"), [f"out_dir={run_dir}"]), DistInfo())
    models = {"student": load_finetuned_recommender(ctx, run_dir / "distill_finetune" / "student.safetensors",
                                                    ctx.cfg.distill.student_layers)[0]}
    if teacher:
        name = best_teacher(run["summary"])
        models["teacher"] = load_finetuned_recommender(
            ctx, run_dir / "finetune_teachers" / "teachers" / f"{name}.safetensors")[0]
    return ctx, models


# -- measuring -------------------------------------------------------------------------------------------------
def variant_names(sizes: list[int]) -> list[str]:
    return ["teacher", *[f"student_l{n}" for n in sizes]]


def measure(runs: dict, sizes: list[int], batch: int, news: int, rounds: int) -> dict:
    """Parameters and speed on the first seed's models, dev AUC of every seed's at every precision."""
    import numpy as np
    import torch

    from speedyrec.build import segments_of
    from speedyrec.engine import runlog
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.engine.precision import native_bf16
    from speedyrec.eval.evaluate import evaluate_models
    from speedyrec.models.inference import cpu_has_vnni, inference_model, parameter_counts, quantized_linears
    from speedyrec.models.news_inputs import NewsInputs

    runlog.QUIET = True  # no progress bars inside timed blocks
    dist = DistInfo()
    bf16 = native_bf16(dist.device)
    precisions = [p for p in PRECISIONS if p != "bf16" or bf16]
    auc: dict = {}  # variant -> precision -> seed -> dev metrics
    speed: dict = {}
    params: dict = {}
    # variant -> seed -> the AUC the run recorded (at its own train.amp: bf16 where it trained in bf16)
    recorded: dict = {}
    first = min(runs)
    for seed, by_size in sorted(runs.items()):
        for n in sizes:
            if n not in by_size:
                continue
            run_dir, run = by_size[n]
            with_teacher = n == quality.PIPELINE_LAYERS
            ctx, models = load_models(run_dir, run, with_teacher)
            inputs = NewsInputs(ctx.store, segments_of(ctx.cfg))
            named = {f"student_l{n}": models["student"], **({"teacher": models["teacher"]} if with_teacher else {})}
            recorded.setdefault(f"student_l{n}", {})[seed] = run["summary"]["models"]["student"]["auc"]
            if with_teacher:
                recorded.setdefault("teacher", {})[seed] = run["summary"]["models"][best_teacher(run["summary"])]["auc"]
            for variant, model in named.items():
                layers = len(model.news_encoder.backbone.layers)
                params.setdefault(variant, {**parameter_counts(model), "layers": layers})
                for precision in precisions:
                    served, amp = inference_model(model, precision)
                    if precision == "int8":
                        assert quantized_linears(served) > 0, "int8: no linear map was quantised"
                    print(f"seed {seed}: dev AUC of {variant} at {precision}", flush=True)
                    cfg = ctx.cfg
                    m = evaluate_models([served], inputs, ctx.data.dev, dist, max_history=cfg.data.max_history,
                                        batch_size=cfg.eval.batch_size, max_impressions=cfg.eval.max_impressions,
                                        amp=amp)[0]
                    auc.setdefault(variant, {}).setdefault(precision, {})[seed] = m
            if seed == first:  # speed does not depend on the weights: one seed's models, all sizes together
                rng = np.random.default_rng(0)
                sample = np.sort(rng.choice(ctx.store.num_news, size=min(news, ctx.store.num_news), replace=False))
                for variant, model in named.items():
                    for precision in precisions:
                        speed[(variant, precision)] = (inference_model(model, precision), inputs, sample)
    threads = torch.get_num_threads()
    times = {k: [] for k in speed}
    with torch.inference_mode():
        from speedyrec.eval.evaluate import encode_news

        def block(key):
            (served, amp), inputs, sample = speed[key]
            t0 = time.perf_counter()
            encode_news(served, inputs, sample, dist, batch, amp)
            return len(sample) / (time.perf_counter() - t0)

        print(f"timing {len(speed)} variants: 1 warm-up and {rounds} rounds of {news} news each", flush=True)
        for key in speed:
            block(key)
        for _ in range(rounds):
            for key in speed:  # interleaved: a busy moment of the machine falls on every variant alike
                times[key].append(block(key))
    news_per_s = {}
    for (variant, precision), values in times.items():
        news_per_s.setdefault(variant, {})[precision] = {"median": statistics.median(values), "blocks": values}
    bits = 8 if cpu_has_vnni() else 7
    return {"auc": auc, "news_per_s": news_per_s, "params": params, "recorded_auc": recorded, "threads": threads,
            "precisions": precisions, "bf16_native": bf16 or None,
            "int8_path": f"torch.ao.quantization.quantize_dynamic (int8 weights per output channel, activations "
                         f"quantised per batch on {bits} bits, int32 accumulation)"}


# -- the tables ------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(measured: dict, runs: dict, sizes: list[int]) -> dict:
    """The results file: ``rows`` (teacher, then students by size) with ``layers``, ``params``, ``news_per_s``
    and ``auc`` ({fp32, bf16, int8}: the median speed; the mean dev AUC over seeds, None where not measured), the
    stage times, and the verdict."""
    rows = []
    teacher_speed = measured["news_per_s"]["teacher"]["fp32"]["median"]
    for variant in variant_names(sizes):
        if variant not in measured["params"]:
            continue
        par = measured["params"][variant]
        speeds = {p: (measured["news_per_s"].get(variant, {}).get(p) or {}).get("median") for p in PRECISIONS}
        by_seed = measured["auc"].get(variant, {})
        auc = {p: {s: m["auc"] for s, m in by_seed.get(p, {}).items()} for p in PRECISIONS}
        fp32 = auc["fp32"]
        drop = {p: [100 * (auc[p][s] - fp32[s]) for s in auc[p] if s in fp32] for p in PRECISIONS}
        rows.append({
            "model": "teacher" if variant == "teacher" else "student", "layers": par["layers"],
            "params": par["total"], "params_without_embeddings": par["without_embeddings"],
            "embeddings": par["embeddings"],
            "news_per_s": speeds,
            "speedup_vs_teacher_fp32": {p: (v / teacher_speed if v else None) for p, v in speeds.items()},
            "auc": {p: (_mean_std(list(v.values()))[0] if v else None) for p, v in auc.items()},
            "auc_std": {p: (_mean_std(list(v.values()))[1] if v else None) for p, v in auc.items()},
            "auc_per_seed": auc,
            "auc_minus_fp32_points": {p: (_mean_std(d) if d else None) for p, d in drop.items()},
            "auc_recorded_by_the_run": measured["recorded_auc"].get(variant, {}),
            "seeds": sorted(fp32)})
    teacher = rows[0]
    for r in rows:
        r["fewer_params_than_teacher"] = 1 - r["params"] / teacher["params"]
        r["fewer_params_without_embeddings"] = 1 - r["params_without_embeddings"] / teacher["params_without_embeddings"]
        r["best_precision"] = best_precision(r)
    stage_seconds = stage_times(runs, sizes)
    payload = {"rows": rows, "stage_seconds": stage_seconds, "threads": measured["threads"],
               "precisions_measured": measured["precisions"], "bf16_native": measured["bf16_native"],
               "int8_path": measured["int8_path"],
               "seeds": sorted(runs), "layers": sizes,
               "goal": {"student_layers": quality.PIPELINE_LAYERS, "speedup": GOAL_SPEEDUP,
                        "auc_points": GOAL_AUC_POINTS},
               "paper": {"speedup": PAPER_SPEEDUP, "fewer_params": PAPER_FEWER_PARAMS, "params_m": PAPER_PARAMS_M,
                         "hours": PAPER_HOURS},
               "runs": {str(seed): {str(n): {"dir": str(d), "command": r["command"], "commit": r.get("commit"),
                                              "seconds": r["summary"]["seconds"]} for n, (d, r) in by_size.items()}
                        for seed, by_size in runs.items()}}
    payload["verdict"] = verdict(payload)
    return payload


def best_precision(row: dict) -> str:
    """The fastest precision measured whose mean dev AUC is within GOAL_AUC_POINTS of the model's fp32 AUC (fp32
    when none is, or when a precision's AUC was not measured)."""
    drop = row["auc_minus_fp32_points"]
    ok = [p for p in PRECISIONS if row["news_per_s"].get(p) and (
        p == "fp32" or (drop.get(p) and abs(drop[p][0]) <= GOAL_AUC_POINTS))]
    return max(ok, key=lambda p: row["news_per_s"][p]) if ok else "fp32"


def stage_times(runs: dict, sizes: list[int]) -> dict:
    """{step: {"teacher" or student layers: {"mean", "std", "seeds"}}} of wall seconds: the teacher steps from
    the base runs, the student steps from each size's run."""
    out: dict = {}
    for step, _, who in STEPS:
        cols = ["teacher"] if who == "teacher" else sizes
        for col in cols:
            n = quality.PIPELINE_LAYERS if col == "teacher" else col
            values = [by_size[n][1]["summary"]["seconds"][step] for by_size in runs.values()
                      if n in by_size and step in by_size[n][1]["summary"]["seconds"]]
            if values:
                mean, std = _mean_std(values)
                out.setdefault(step, {})[str(col)] = {"mean": mean, "std": std, "seeds": len(values)}
    return out


def verdict(d: dict) -> list[str]:
    """Sentences generated from the numbers: the goal, then the paper's claims."""
    rows = {r["layers"]: r for r in d["rows"] if r["model"] == "student"}
    teacher = next(r for r in d["rows"] if r["model"] == "teacher")
    lines = []
    goal = d["goal"]
    s = rows.get(goal["student_layers"])
    if s is not None:
        p = s["best_precision"]
        x = s["speedup_vs_teacher_fp32"][p]
        drop = s["auc_minus_fp32_points"].get(p)
        drop_text = "" if p == "fp32" or not drop else f", AUC {drop[0]:+.2f} points against its fp32 self"
        met = x >= goal["speedup"] and (p == "fp32" or (drop and abs(drop[0]) <= goal["auc_points"]))
        lines.append(f"Goal {'met' if met else 'not met'}: the {goal['student_layers']}-layer student at its best "
                     f"precision ({p}{drop_text}) encodes {x:.1f}x the news per second of the fp32 teacher "
                     f"(goal ≥ {goal['speedup']:.0f}x, AUC within {goal['auc_points']} points).")
        fastest = max((q for q in PRECISIONS if s["news_per_s"].get(q)), key=lambda q: s["news_per_s"][q])
        if fastest != p:
            fd = s["auc_minus_fp32_points"].get(fastest)
            lines.append(f"Its fastest precision, {fastest} ({s['speedup_vs_teacher_fp32'][fastest]:.1f}x), costs "
                         f"{fd[0]:+.2f} AUC points, past the {goal['auc_points']}-point bar." if fd else
                         f"Its fastest precision is {fastest} ({s['speedup_vs_teacher_fp32'][fastest]:.1f}x), "
                         "whose AUC was not measured.")
    lo, hi = d["paper"]["speedup"]
    fp32 = {n: r["speedup_vs_teacher_fp32"]["fp32"] for n, r in sorted(rows.items())}
    best = {n: r["speedup_vs_teacher_fp32"][r["best_precision"]] for n, r in sorted(rows.items())}
    inside = all(lo <= v <= hi for v in fp32.values())
    lines.append(f"Paper (Figure 5): students {lo:.0f}-{hi:.0f}x faster than the teacher (theirs has 12 layers, ours "
                 f"{teacher['layers']}). Here at fp32: " + ", ".join(f"{_layers(n)} {v:.1f}x" for n, v in fp32.items())
                 + (" (within that range)" if inside else " (not all within it)") + "; at each one's best precision: "
                 + ", ".join(f"{_layers(n)} {v:.1f}x" for n, v in best.items()) + ".")
    plo, phi = d["paper"]["fewer_params"]
    fewer = {n: r["fewer_params_than_teacher"] for n, r in sorted(rows.items())}
    fewer_x = {n: r["fewer_params_without_embeddings"] for n, r in sorted(rows.items())}
    lines.append(f"Paper: {100 * plo:.0f}-{100 * phi:.0f}% fewer parameters (embeddings counted, 12-layer teacher). "
                 "Here, embeddings counted: " + ", ".join(f"{_layers(n)} {100 * v:.0f}%" for n, v in fewer.items())
                 + ("" if all(plo <= v <= phi for v in fewer.values()) else " (not all within that range: "
                    f"the embeddings, {100 * teacher['embeddings'] / teacher['params']:.0f}% of the teacher, "
                    "stay whole)")
                 + "; without embeddings: "
                 + ", ".join(f"{_layers(n)} {100 * v:.0f}%" for n, v in fewer_x.items()) + ".")
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
        speeds = [f"{v:,.0f} ({r['speedup_vs_teacher_fp32'][p]:.1f}x)" if v else "n/a"
                  for p, v in r["news_per_s"].items()]
        rows.append([name, r["layers"], f"{r['params'] / 1e6:.2f}M", f"{r['params_without_embeddings'] / 1e6:.2f}M",
                     "" if r["model"] == "teacher" else f"{100 * r['fewer_params_than_teacher']:.0f}%", *speeds,
                     *[_auc_cell(r, p) for p in PRECISIONS], r["best_precision"]])
    return md_table(["model", "layers", "params", "params w/o embeddings", "fewer params", "news/s fp32 (x teacher)",
                     "news/s bf16", "news/s int8", "AUC fp32", "AUC bf16 (Δ points)", "AUC int8 (Δ points)",
                     "best precision"], rows)


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
            cells.append("" if v is None else f"{v['mean']:.0f}" + (f" ± {v['std']:.0f}" if v["seeds"] > 1 else ""))
        paper = d["paper"]["hours"].get(paper_of.get(step, ""), {})
        hours = ", ".join(f"{paper[k if k == 'teacher' else int(k)]} h" for k in (cols if paper else [])
                          if (k if k == "teacher" else int(k)) in paper)
        rows.append([what, *cells, hours])
    return md_table(["step", f"teacher ({TEACHER_LAYERS} layers)", *[f"{n}-layer student" for n in sizes],
                     "paper A.4 (12-layer teacher; 4, 2, 1-layer students)"], rows)


def report(d: dict) -> str:
    m = d["machine"]
    # read back from a results file, what it recorded; in the run that writes it, the time so far
    took = m.get("seconds", m.get("invocation_seconds", time.time() - m.get("started", time.time())))
    lines = ["# Efficiency: Tiny-NewsRec's Figure 5 and A.4\n",
             f"Commit {m.get('commit', '?')}, {m['device']}, torch {m['torch']}, {d['threads']} threads; "
             f"`{d['command']}`{' (quick settings: tiny random encoders)' if d['quick'] else ''}; "
             f"{took / 60:.1f} min in all"
             + (f" ({d['kept_runs_reused']} kept training runs reused, their time not counted)"
                if d.get("kept_runs_reused") else "") + ".\n",
             f"News encoded per second: the news encoder at each precision through the export's path (length-sorted "
             f"batches of {d['batch']} titles from the token store, float32 vectors out), {d['news_timed']} news per "
             f"block, 1 warm-up and the median of {d['rounds']} interleaved blocks per variant, in inference mode; "
             f"ratios against the fp32 teacher of this invocation. bf16: "
             + (f"native ({d['bf16_native']})" if d["bf16_native"] else "not measured (no native bf16 here)")
             + f". int8: {d['int8_path']} of the transformer layers' linear maps. Dev AUC (x100) through the "
             f"project's evaluation at each precision (user encoder in bf16 autocast for bf16, float32 for int8), "
             f"mean ± std over seeds {', '.join(map(str, d['seeds']))}, paired difference to fp32 in brackets. "
             f"Parameters of the whole recommender (news and user encoder).\n",
             figure_table(d),
             "\nWall time of each pipeline step (s, mean over seeds) per model size, beside the paper's (A.4):\n",
             stage_table(d),
             "\n" + ("Quick settings (tiny random encoders, 2 timed blocks): these numbers check the harness, not the "
                     "paper's claims or the goal.\n\n" if d["quick"] else "")
             + "\n".join(f"- {v}" for v in d["verdict"]) + "\n"]
    return "\n".join(lines)


def plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    rows = d["rows"]
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
