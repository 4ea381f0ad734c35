"""Tiny-NewsRec's Table 3 on our data: teachers and students, mean and spread over seeds.

``python -m benchmarks.quality [--quick] [--seeds 0,1,2] [--out DIR] [--fresh]``

A seed takes over an hour on 2 CPU cores: a seed already in ``benchmarks/results/quality.json`` with the same
settings is reused (``--fresh`` runs it again), so the three seeds may be measured by separate invocations.

Each seed runs ``stage=pipeline pipeline.baselines=true train.seed=S`` on the synthetic default with
all-MiniLM-L6-v2 (M = 4 teachers, a 2-layer student): the post-trained teachers (PLM-NR DP) against the plainly
finetuned teacher (PLM-NR FT), and the Tiny-NewsRec student against the same student finetuned without teachers
and against NewsBERT's student. Students of the other sizes (``--layers``, default 1, 2 and 4 as in the paper)
run the same pipeline with ``distill.student_layers=N``, linking that seed's post-training and finetuned teachers
(``pipeline.teachers_from``) instead of training them again; NewsBERT's 4-layer student is not run, as
MiniLM-L6's 6 layers do not split into 4 blocks. The seed changes post-training order and initialisation, every
finetuning's data order, sampling and initialisation; the data set is the same. A teacher row is the mean over
the M post-trained teachers of a seed, then over seeds.

Cost here (2 cores): about 77 min per seed for the 2-layer pipeline, and about 30 min per seed for each other
student size (Stage I, Stage II, the plain student, NewsBERT's); about 7 hours for 3 seeds and 3 sizes.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import (RESULTS, machine, md_table, note_not_run, note_reused, run_job, source_commit,
                               write_results)

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")
PIPELINE_LAYERS = 2  # the pipeline's own student (distill.student_layers' default)
PLM_LAYERS = 6  # all-MiniLM-L6-v2: NewsBERT's teacher splits into blocks for a student of 1, 2, 3 or 6 layers
TEACHER_ROWS = (("teacher_dp", "PLM-NR DP: post-trained, then finetuned teachers (mean of M)"),
                ("teacher_ensemble", "Ensemble-Teacher: the M post-trained teachers' mean score at test time "
                                     "(the student distills their per-sample weighted scores, not this mean)"),
                ("plain", "PLM-NR FT: the plainly finetuned teacher"))
STUDENT_ROWS = (("student", "Tiny-NewsRec student"), ("student_plain", "the student finetuned without teachers"),
                ("newsbert_student", "NewsBERT's student"))
ROWS = TEACHER_ROWS + STUDENT_ROWS  # the 2-layer table (rows of other student sizes carry the suffix _l<N>)
# --quick checks the harness: a tiny random 6-layer BERT (teachers train their top 2, as MiniLM-L6's do)
TINY6 = ["model.encoder=random:hidden=32,layers=6,heads=2,intermediate=64", "model.vocab_size=800"]
QUICK = [*TINY6, "data.synthetic_users=300", "posttrain.teachers=2", "posttrain.snapshot_after=6",
         "posttrain.snapshot_every=3", "posttrain.holdout=50", "distill.stage1_epochs=1", "train.max_steps=6",
         "eval.max_impressions=100"]


def key(name: str, layers: int) -> str:
    return name if layers == PIPELINE_LAYERS else f"{name}_l{layers}"


def split_key(row: str) -> tuple[str, int]:
    """(model name, student layers) of a row key; teachers' rows give the pipeline's student size."""
    name, _, n = row.rpartition("_l")
    return (name, int(n)) if name and n.isdigit() else (row, PIPELINE_LAYERS)


def table_rows(layers: list[int]) -> list[tuple[str, str]]:
    """(row key, label): the teachers, then each student size's three students."""
    rows = list(TEACHER_ROWS)
    for n in sorted(layers):
        rows += [(key(name, n), what) for name, what in STUDENT_ROWS]
    return rows


def seed_models(summary: dict, layers: int = PIPELINE_LAYERS, teachers: bool = True) -> dict:
    """One pipeline run's rows: the post-trained teachers averaged, the others as they are (students keyed by size;
    a student the run did not train, NewsBERT's where the teacher does not split into blocks, is left out)."""
    models = summary["models"]
    rows = {}
    if teachers:
        dp = [m for name, m in models.items() if name.startswith("teacher_")]
        rows["teacher_dp"] = {**{k: statistics.mean(t[k] for t in dp) for k in METRICS}, "layers": dp[0]["layers"]}
        rows["plain"] = {k: models["plain"][k] for k in (*METRICS, "layers")}
        if "ensemble" in models:  # absent from runs made before the ensemble was evaluated
            rows["teacher_ensemble"] = {k: models["ensemble"][k] for k in (*METRICS, "layers")}
    for name, _ in STUDENT_ROWS:
        if name in models:
            rows[key(name, layers)] = {k: models[name][k] for k in (*METRICS, "layers")}
    return rows


def pipeline_overrides(seed: int, layers: int, quick: bool) -> list[str]:
    over = ["stage=pipeline", "pipeline.baselines=true", f"train.seed={seed}"]
    if layers != PIPELINE_LAYERS:
        over.append(f"distill.student_layers={layers}")
        if PLM_LAYERS % layers:
            over.append("pipeline.newsbert=false")
    return over + (QUICK if quick else [])


def teachers_of(root: Path, seed: int) -> Path | None:
    """A finished run of this seed whose teachers a student of another size can link (pipeline.teachers_from)."""
    for d in [root / f"seed_{seed}", root / base_name(seed), *sorted(root.glob(f"seed_{seed}_l*"))]:
        if (d / "finetune_teachers" / "done.json").exists() and not (d / "finetune_teachers").is_symlink():
            return d
    return None


def experiment_parser(prog: str, doc: str, quick_help: str = "quality's tiny settings: checks the harness in "
                                                                         "minutes") -> argparse.ArgumentParser:
    """The options of the Tiny-NewsRec experiments measured across sessions (ablation, kd_methods, teacher_count,
    student_gap): their seeds, where runs are kept, and whether recorded runs are reused or only tabulated."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--seeds", default=None, help="seeds to run, beside those recorded (default 0,1,2; --quick: 0)")
    p.add_argument("--out", default="", help="keep the runs here, beside the seeds' base runs (base_seed_S) "
                   "(default: a temporary folder)")
    p.add_argument("--fresh", action="store_true", help="run every row, even those recorded in the results file")
    p.add_argument("--kept-only", action="store_true", help="run nothing: tabulate the runs kept in --out or "
                   "recorded, and name the ones missing")
    return p


def recorded_seeds(runs: dict) -> list[int]:
    """The seeds whose runs ``runs`` (a results file's and its ledger's, by run name: ``..._seed_S[_...]``,
    ``seed_S_...``) holds: an invocation for seed 1 tabulates seed 0's, recorded by an earlier session, beside it."""
    return sorted({int(m.group(1)) for name in runs if (m := re.search(r"(?:^|_)seed_(\d+)(?:_|$)", name))})


def seed_list(seeds: str | None, quick: bool) -> list[int]:
    """The seeds of ``--seeds`` (comma-separated); by default 0, 1, 2, or 0 alone with --quick."""
    return [int(s) for s in (seeds or ("0" if quick else "0,1,2")).split(",")]


# The base run of the benchmarks that vary the student (ablation, kd_methods, efficiency): this benchmark's seed
# run without NewsBERT's single-teacher student, which none of them reads (it is ~23 of the ~77 minutes)
BASE_SWITCH = ["pipeline.newsbert=false"]


def base_name(seed: int) -> str:
    return f"base_seed_{seed}"


def base_overrides(seed: int, quick: bool) -> list[str]:
    return [*pipeline_overrides(seed, PIPELINE_LAYERS, quick), *BASE_SWITCH]


def seed_base_run(root: Path, seed: int, quick: bool, may_run: bool = True) -> tuple[Path, dict] | None:
    """The full pipeline of seed ``seed`` but NewsBERT's (run ``base_seed_S``: the M teachers, the plain teacher,
    Tiny-NewsRec's 2-layer student, the student without teachers), which the benchmarks that vary only the
    student build on: they link its teachers (``student_run``). Kept in ``root`` by an earlier invocation (of any
    of them), or run now, continuing an interrupted one (about 54 min on 2 cores; --quick a minute). Returns (its
    folder, its record: ``summary`` is its metrics.json), or None when it is not kept and ``may_run`` is false.
    A run committed in a results file without its folder does not count: its teachers' files are needed."""
    name = base_name(seed)
    run = obtain(root, name, base_overrides(seed, quick), None, may_run=may_run)
    if run is None:
        return None
    run_dir = root / name
    if not (run_dir / "finetune_teachers" / "done.json").exists():
        raise SystemExit(f"{run_dir} holds no finished teachers (finetune_teachers/done.json): use another --out")
    return run_dir, run


def base_run_record(root: Path, seed: int, quick: bool, committed: dict, may_run: bool = True) -> dict | None:
    """The record of seed ``seed``'s base run: the run kept in ``root`` (or run now: ``seed_base_run``), or the one a
    results file recorded (``committed``, by run name) with today's settings when ``root`` keeps none; None when
    neither exists and it may not run. For the rows the base run gives (its student, its teachers' ensemble)."""
    name = base_name(seed)
    recorded = committed.get(name)
    if (root / name / "quality_run.json").exists() or recorded is None or \
            not same_settings(recorded, base_overrides(seed, quick)):
        base = seed_base_run(root, seed, quick, may_run=may_run)
        return None if base is None else base[1]
    print(f"{name}: reusing the recorded run (--fresh runs it again)", flush=True)
    note_reused(name)
    return recorded


def student_run(root: Path, name: str, seed: int, quick: bool, switch: list[str], committed: dict | None = None,
                may_run: bool = True) -> dict | None:
    """``stage=pipeline`` of seed ``seed`` with ``switch`` (settings of the student's stages), linking the seed's
    base run's post-training and finetuned teachers (``seed_base_run``, run first where it is not kept), so only
    the student's stages train; kept in ``root/name``, or ``committed`` (a results file's record of the same
    settings). Returns its record (``summary``: its metrics.json), or None when it must run and ``may_run`` is
    false."""
    overrides = ["stage=pipeline", f"train.seed={seed}", *switch, *(QUICK if quick else [])]
    done = root / name / "quality_run.json"
    if not done.exists() and not (committed is not None and same_settings(committed, overrides)):
        base = seed_base_run(root, seed, quick, may_run)
        if base is None:
            return None
        return obtain(root, name, overrides, None, [f"pipeline.teachers_from={base[0]}"], may_run=may_run)
    return obtain(root, name, overrides, committed, may_run=may_run)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 users, 2 teachers, a few steps per stage")
    p.add_argument("--seeds", default=None, help="default 0,1,2 (--quick: 0)")
    p.add_argument("--layers", default="1,2,4", help="student sizes; the others link the 2-layer run's teachers")
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--fresh", action="store_true", help="run every seed, even those already in the results file")
    p.add_argument("--report", metavar="JSON", help="only re-render the tables from a results file's runs")
    p.add_argument("--kept-only", action="store_true", help="run nothing: tabulate the runs kept in --out or committed, "
                   "and name the ones missing (seeds measured across sessions)")
    a = p.parse_args(argv)
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        return report(*load_runs(saved), saved["machine"], saved["quick"])
    seeds = seed_list(a.seeds, a.quick)
    sizes = sorted({int(n) for n in a.layers.split(",")} | {PIPELINE_LAYERS})
    info = machine()
    committed, committed_students = load_runs(committed_file(a.quick)) if not a.fresh else ({}, {})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        runs, students, payload = {}, {n: {} for n in sizes if n != PIPELINE_LAYERS}, None
        for seed in seeds:
            run = obtain(root, f"seed_{seed}", pipeline_overrides(seed, PIPELINE_LAYERS, a.quick), committed.get(seed),
                         may_run=not a.kept_only)
            if run is None:
                continue
            runs[seed] = run
            models, run_dir = runs[seed]["summary"]["models"], root / f"seed_{seed}"
            if "ensemble" not in models and (run_dir / "finetune_teachers" / "teachers").is_dir():
                print(f"seed {seed}: evaluating the mean score of its post-trained teachers", flush=True)
                models["ensemble"] = teachers_mean_score(run_dir)
                if (run_dir / "quality_run.json").exists():  # kept with the run: a later invocation reads it
                    (run_dir / "quality_run.json").write_text(json.dumps(runs[seed], indent=2) + "\n")
            for n in students:
                src = teachers_of(root, seed)  # none when the 2-layer run was committed by another session
                alone = "" if src else (f"no finished teacher steps of seed {seed} in {root} to link (a step finished "
                                        "when its done.json exists): this run trains its own teachers")
                run = obtain(root, f"seed_{seed}_l{n}", pipeline_overrides(seed, n, a.quick),
                             committed_students.get(n, {}).get(seed), [f"pipeline.teachers_from={src}"] if src else [],
                             may_run=not a.kept_only, announce=alone)
                if run is not None:
                    students[n][seed] = run
            payload = report(runs, students, info, a.quick)  # rewritten after every seed: an interrupted run keeps them
    if payload is None:
        raise SystemExit(f"benchmarks.quality: no run of seeds {a.seeds or 'default'} is kept in {root} or committed")
    return payload


def teachers_mean_score(run_dir: Path) -> dict:
    """Dev metrics of the mean score of a finished pipeline's post-trained teachers, for runs made before
    finetune_teachers evaluated it (their teachers are loaded from the run and evaluated again)."""
    from speedyrec.build import build_context, plm_layers, segments_of
    from speedyrec.config import load_config
    from speedyrec.distill.teachers import load_finetuned_recommender
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.models.news_inputs import NewsInputs
    from speedyrec.recipes.common import evaluate_on_dev

    ctx = build_context(load_config(str(run_dir / "config.yaml"), [f"out_dir={run_dir}"]), DistInfo())
    files = sorted((run_dir / "finetune_teachers" / "teachers").glob("teacher_*.safetensors"))
    models = [load_finetuned_recommender(ctx, f)[0] for f in files]
    *each, result = evaluate_on_dev(ctx, models, NewsInputs(ctx.store, segments_of(ctx.cfg)),
                                    ensemble=list(range(len(models))))
    # each member evaluated again, beside the AUC the run reported for it: the models loaded are the run's
    return {**result, "members": [f.stem for f in files], "layers": plm_layers(ctx), "evaluated_after_the_run": True,
            "member_auc": [r["auc"] for r in each]}


def obtain(root: Path, name: str, overrides: list[str], committed: dict | None, extra: list[str] = (),
           may_run: bool = True, announce: str = "") -> dict | None:
    """One pipeline run: finished earlier in ``root`` (an interrupted invocation), committed in the results file
    with the same settings, or run now (``extra``: settings that do not change what is measured), continuing
    from the steps a run interrupted in ``root`` finished; None when it is none of these and ``may_run`` is false.
    ``announce``: said before running it."""
    done = root / name / "quality_run.json"
    if done.exists():
        run = json.loads(done.read_text())
        if not same_settings(run, overrides):
            raise SystemExit(f"{done} was run with other settings ({run['command']}); use another --out")
        print(f"{name}: reusing {done}", flush=True)
        note_reused(name)
        return run
    if committed is not None and same_settings(committed, overrides):
        print(f"{name}: reusing the committed run (--fresh runs it again)", flush=True)
        note_reused(name)
        return committed
    if not may_run:
        note_not_run(name)
        return None
    if (root / name / "config.yaml").exists():  # interrupted: its finished steps (done.json) are not run again
        extra = [*extra, "train.resume=auto"]
        announce = " ".join(filter(None, [announce, f"continuing the interrupted run in {root / name}"]))
    if announce:
        print(f"{name}: {announce}", flush=True)
    job = run_job(name, [*overrides, *extra], root, timeout=6 * 3600)
    run = {"command": job["command"], "process_seconds": job["process_seconds"], "summary": job["metrics"],
           "commit": source_commit()}  # runs of one table are made across sessions, maybe at several commits
    done.write_text(json.dumps(run, indent=2) + "\n")
    return run


def same_settings(run: dict, overrides: list[str]) -> bool:
    words = run["command"].split()
    size = [o for o in words if o.startswith("distill.student_layers=")]
    # the same overrides, and no other student size (a 1-layer run is not the 2-layer one)
    return all(o in words for o in overrides) and all(o in overrides for o in size)


def committed_file(quick: bool) -> dict:
    """The runs already in benchmarks/results/quality[_quick].json: a seed takes over an hour here, so the seeds
    are measured across invocations, and the table is rewritten with every run that exists."""
    path = RESULTS / ("quality_quick.json" if quick else "quality.json")
    return json.loads(path.read_text()) if path.exists() else {}


def load_runs(saved: dict) -> tuple[dict, dict]:
    runs = {int(k): v for k, v in saved.get("runs", {}).items()}
    students = {int(n): {int(k): v for k, v in by_seed.items()} for n, by_seed in saved.get("student_runs", {}).items()}
    return runs, students


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(runs: dict, students: dict, info: dict, quick: bool) -> dict:
    per_seed = {seed: seed_models(r["summary"]) for seed, r in runs.items()}
    for n, by_seed in students.items():
        for seed, r in by_seed.items():
            per_seed[seed].update(seed_models(r["summary"], n, teachers=False))
    sizes = sorted({PIPELINE_LAYERS, *(n for n, by_seed in students.items() if by_seed)})
    rows = table_rows(sizes)
    table = {}
    for name, _ in rows:
        have = [s for s in per_seed if name in per_seed[s]]
        if not have:
            continue  # e.g. NewsBERT's 4-layer student: MiniLM-L6's 6 layers do not split into 4 blocks
        table[name] = {k: dict(zip(("mean", "std"), _mean_std([per_seed[s][name][k] for s in have]))) for k in METRICS}
        table[name].update(layers=per_seed[have[0]][name]["layers"], seeds=have)
    pairs = [("teacher_dp", "plain")] + [(key("student", n), key(b, n)) for n in sizes
                                         for b in ("student_plain", "newsbert_student")] + \
            [(key("student", n), "teacher_ensemble") for n in sizes]
    paired = {}
    for a, b in pairs:
        both = [s for s in per_seed if a in per_seed[s] and b in per_seed[s]]
        if both:
            paired[f"{a} - {b}"] = {k: dict(zip(("mean", "std"), _mean_std([per_seed[s][a][k] - per_seed[s][b][k]
                                                                           for s in both]))) for k in METRICS}
            paired[f"{a} - {b}"]["seeds"] = both
    seconds = {seed: r["summary"]["seconds"] for seed, r in runs.items()}
    for n, by_seed in students.items():
        for seed, r in by_seed.items():
            seconds[f"{seed} ({n} layers)"] = r["summary"]["seconds"]
    payload = {"machine": info, "quick": quick, "seeds": list(runs), "layers": sizes, "rows": rows, "table": table,
               "paired": paired, "per_seed": per_seed, "seconds": seconds, "runs": runs,
               "student_runs": {n: by_seed for n, by_seed in students.items() if by_seed}}
    md = ["# Quality: Tiny-NewsRec Table 3 on the synthetic default\n",
          f"Device: {info['device']}, torch {info['torch']}. Each seed: `python -m speedyrec.train stage=pipeline "
          f"pipeline.baselines=true train.seed=S`{' (quick settings)' if quick else ''}; all-MiniLM-L6-v2, M = 4 "
          f"teachers, a 2-layer student; students of other sizes (`distill.student_layers=N`) learn from the same "
          f"seed's teachers (`pipeline.teachers_from`). Mean ± standard deviation over seeds, in points (x100).\n",
          quality_table(payload),
          "\nPaired by seed (the same seed gives both runs the same data order), the difference in points:\n",
          md_table(["comparison", "seeds", "AUC", "MRR", "nDCG@5", "nDCG@10"],
                   [[k, len(v["seeds"]), *[f"{100 * v[m]['mean']:+.2f}" + (f" ± {100 * v[m]['std']:.2f}"
                                                                          if len(v["seeds"]) > 1 else "")
                                            for m in METRICS]] for k, v in paired.items()]),
          "\nAUC of each seed:\n",
          md_table(["seed", *[n for n in table]],
                   [[s, *[f"{100 * per_seed[s][n]['auc']:.2f}" if n in per_seed[s] else "" for n in table]]
                    for s in per_seed]),
          "\nWall time of each step (s), per run (a run of another student size links the teachers):\n",
          md_table(["run", "steps"], [[run, ", ".join(f"{k} {v:.0f}" for k, v in s.items())]
                                      for run, s in seconds.items()])]
    if not quick:
        md += student_gap_section()
    write_results("quality_quick" if quick else "quality", payload, "\n".join(md),
                  plot=lambda path: _plot(path, payload))
    print("\n".join(md))
    return payload


def student_gap_section() -> list[str]:
    """Why the student beats its teachers, as quality.md states it: benchmarks.student_gap's verdict, read from its
    results file when it exists (that benchmark builds on this one's runs, so it is read, not imported)."""
    path = RESULTS / "student_gap.json"
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    return ["\n## Why the student beats its teachers\n",
            f"From benchmarks/results/student_gap.md ({len(d['seeds'])} seed(s); one controlled run per "
            "hypothesis, paired by seed):\n", "\n".join(d["verdict"]), ""]


def quality_table(d: dict) -> str:
    """The table of every model (README and quality.md): mean ± std over the seeds that ran it."""
    t = d["table"]
    rows = []
    for name, what in d.get("rows", ROWS):
        if name not in t and not name.startswith("newsbert_student"):
            continue  # not measured (the ensemble row of runs made before it was evaluated)
        if name not in t:
            n = split_key(name)[1]
            rows.append([what, n, *(["n/a"] * len(METRICS)), f"none: {PLM_LAYERS} teacher layers do not split "
                                                               f"into {n} blocks" if PLM_LAYERS % n else "none"])
            continue
        many = len(t[name].get("seeds", d["seeds"])) > 1  # one seed has no spread: say so instead of printing ± 0
        def cell(v, many=many):
            return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if many else f"{100 * v['mean']:.2f}"
        seeds = t[name].get("seeds", d["seeds"])
        rows.append([what, t[name]["layers"], *[cell(t[name][k]) for k in METRICS], len(seeds)])
    return md_table(["model", "layers", "AUC", "MRR", "nDCG@5", "nDCG@10", "seeds"], rows)


def _plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    t = d["table"]
    colors = {"teacher_dp": "#4c72b0", "teacher_ensemble": "#4c72b0", "plain": "#8c8c8c", "student": "#dd8452",
              "student_plain": "#8c8c8c", "newsbert_student": "#55a868"}
    labels = {"teacher_dp": "teachers DP", "teacher_ensemble": "Ensemble-Teacher (mean score)", "plain": "teacher FT",
              "student": "Tiny-NewsRec", "student_plain": "student FT", "newsbert_student": "NewsBERT"}
    names = [n for n, _ in d["rows"] if n in t]
    base = [split_key(n)[0] for n in names]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4))
    means = [100 * t[n]["auc"]["mean"] for n in names]
    stds = [100 * t[n]["auc"]["std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=[colors[b] for b in base])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{labels[b]}\n{t[n]['layers']} layers" for n, b in zip(names, base)], fontsize=8)
    ax.set_ylabel("dev AUC (x100)")
    ax.set_ylim(min(m - s for m, s in zip(means, stds)) - 2, max(m + s for m, s in zip(means, stds)) + 1)
    ax.set_title("Teachers and students, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
