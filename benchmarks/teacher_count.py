"""Tiny-NewsRec's Figure 2 on our data: the number of teachers M = 1..6 against the student's quality and the cost of
producing it; mean and spread over seeds.

``python -m benchmarks.teacher_count [--quick] [--seeds 0,1,2] [--out DIR] [--kept-only] [--fresh]``

Every run is ``stage=pipeline train.seed=S posttrain.teachers=6 distill.teachers=M`` (the 2-layer student of
all-MiniLM-L6-v2 on the synthetic default, as every quality run). Per seed S:

- ``teacher_count_m6_seed_S``: the whole pipeline with 6 teachers (post-training keeping 6 snapshots, Stage I, the 6
  teachers finetuned together, Stage II): the row M = 6.
- ``teacher_count_pass_m1_seed_S``: the teacher-finetuning pass alone with the first of those teachers
  (``stage=finetune_teachers distill.teachers=1 distill.from_dir=`` the m6 run): the cost of one teacher, measured.
- ``teacher_count_mM_seed_S``, M = 1..5: ``distill.teachers=M`` and ``pipeline.teachers_from`` the seed's m6 run, so
  only Stage I and Stage II train again, reading the first M snapshots and their finetuned teachers: the ones a
  ``posttrain.teachers=M`` pipeline has (snapshot k is taken at the same step whatever M is, and each teacher is
  finetuned on its own loss, clipped on its own, from the shared data order; tests/test_teacher_count.py checks
  both, bit for bit, on a tiny encoder without dropout). With dropout (MiniLM's 0.1) the teachers of one pass draw
  their masks from one random stream, so teacher k of 6 is teacher k of M up to its dropout masks, as a reseeded
  run would be: the md sets teacher 1's AUC finetuned alone beside its AUC in the 6-teacher pass to show the size.

Quality of a row: the student's dev AUC, MRR, nDCG@5, nDCG@10. Cost of a row, in seconds: teacher finetuning for M
teachers plus Stage II (the issue's cost of producing the student), and beside them post-training up to snapshot M
(its elapsed seconds when the snapshot was kept) and Stage I. Stage I and Stage II are measured in each row's own
run; Stage I without its teacher bank (the snapshots' news vectors), which the m6 run builds and the others read:
the md sets it apart. The teachers train together in one pass. The pass is measured at M = 1 (the pass_m1 run)
and M = 6 (the m6 run's step), side by side in one invocation, and the rows between read the straight line
a + b*M through the two (exact when the pass costs the teachers' shared work, the frozen bottom layers run once for
all of them, the data, batching and caching, plus an equal part per teacher; the md says when it is not).
Differences to M = 4 (the paper's choice) are paired by seed: a seed's rows share its post-training, its teachers
and its data order.

Cost here (2 cores, the cores to themselves; seed 0 measured): the m6 pipeline 36 min (post-training 3.4 min,
Stage I 4.1, the 6 teachers 24, Stage II 4.5), each other row ~5.3 (Stage I and Stage II), the one-teacher pass
3.4, so ~67 min per seed and ~3.4 hours for 3 seeds; the md records every run's times. Runs are kept in
``--out`` (an interrupted invocation continues) and recorded in ``benchmarks/results/teacher_count.json``, whose
rows a later session reuses; a seed's M < 6 rows and its one-teacher pass need its m6 run's folder (its snapshots
and teachers' files), so finish a seed within one invocation (or keep ``--out``). ``--kept-only`` runs nothing
and re-renders the tables from what is kept or recorded. ``--quick`` checks the harness on quality's tiny random
encoder with M = 1..3 in a few minutes.

On MIND (or any data, encoder, student size): the runs take any training setting, e.g. ``--set data.format=mind
--set data.dir=DIR --name teacher_count_mind`` (``--name`` is then required: such runs are another table).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import clear_mark, committed_runs, machine, md_table, run_job_relocated, write_results
from benchmarks.quality import METRICS, QUICK, experiment_parser, obtain, same_settings, seed_list

MOST = 6  # the paper's Figure 2: M = 1..6
QUICK_MOST = 3  # --quick: M = 1..3 of quality's tiny settings
REFERENCE = 4  # the paper's choice, which every other row is paired against
# the parts of a row's cost (seconds), in the order of the pipeline
PARTS = {"posttrain": "post-training to snapshot M", "stage1": "Stage I (its training)",
         "teachers": "teacher finetuning", "stage2": "Stage II", "student": "teachers + Stage II",
         "all": "all four"}
BANK = "stage1_bank_seconds"  # a pipeline run's record: the seconds its Stage I spent building its teacher bank


def counts(most: int) -> list[int]:
    return list(range(1, most + 1))


def reference(most: int) -> int:
    """The row the others are paired against: M = 4, or the largest M where fewer run (--quick)."""
    return min(REFERENCE, most)


def run_name(m: int, seed: int) -> str:
    return f"teacher_count_m{m}_seed_{seed}"


def pass_name(seed: int) -> str:
    return f"teacher_count_pass_m1_seed_{seed}"


def run_overrides(seed: int, m: int, most: int, quick: bool, settings: list[str] = (),
                  stage: str = "pipeline") -> list[str]:
    """A row's settings: post-training keeps ``most`` snapshots, both distillation stages read the first ``m``
    (``stage=finetune_teachers``: the one-teacher pass, which finetunes the first ``m``)."""
    tiny = [o for o in QUICK if not o.startswith("posttrain.teachers=")] if quick else []
    return [f"stage={stage}", f"train.seed={seed}", f"posttrain.teachers={most}", f"distill.teachers={m}", *tiny,
            *settings]


def with_bank(run: dict | None, folder: Path) -> dict | None:
    """A pipeline run's record with ``stage1_bank_seconds``: the seconds its Stage I spent building the teacher bank
    (the post-trained snapshots' news vectors, kept by checksum in the data's cache). The seed's full run builds it
    for all its teachers and every other row reads it there, so a row's Stage I is compared without it. Read from
    the run's folder (``distill_posttrain/done.json``) when the record lacks it; a recorded run keeps it."""
    if run is None or BANK in run:
        return run
    done = folder / "distill_posttrain" / "done.json"
    if not done.exists():
        raise SystemExit(f"{folder.name}: its record has no {BANK} and {done} is not kept: run it again (--fresh)")
    return {**run, BANK: json.loads(done.read_text())["result"]["stats"]["bank_seconds"]}


def seed_runs(root: Path, seed: int, most: int, quick: bool, committed: dict, may_run: bool,
              settings: list[str] = ()) -> dict:
    """The records of one seed's rows, by run name: kept in ``root``, recorded in ``committed`` (by run name, with
    the same settings), or run now. A row M < ``most`` that must run links the teachers of the seed's full run
    (M = ``most``), which is run first where ``root`` does not keep it: a recorded full run has no files."""
    runs, linked = {}, {}
    full = run_name(most, seed)

    def teachers_dir() -> Path | None:
        if "dir" not in linked:
            run = with_bank(obtain(root, full, run_overrides(seed, most, most, quick, settings), None,
                                   may_run=may_run), root / full)
            linked["dir"] = None if run is None else root / full
            if run is not None:
                runs[full] = run
                if not (root / full / "finetune_teachers" / "done.json").exists():
                    raise SystemExit(f"{root / full} holds no finished teachers (finetune_teachers/done.json): "
                                     "use another --out")
        return linked["dir"]

    for m in counts(most)[:-1]:
        name, over = run_name(m, seed), run_overrides(seed, m, most, quick, settings)
        recorded = committed.get(name)
        if (root / name / "quality_run.json").exists() or (recorded is not None and same_settings(recorded, over)) \
                or not may_run:
            run = obtain(root, name, over, recorded, may_run=may_run)
        else:
            src = teachers_dir()
            run = None if src is None else obtain(root, name, over, None, [f"pipeline.teachers_from={src}"])
        if run is not None:
            runs[name] = with_bank(run, root / name)
    if full not in runs:
        run = with_bank(obtain(root, full, run_overrides(seed, most, most, quick, settings), committed.get(full),
                               may_run=may_run), root / full)
        if run is not None:
            runs[full] = run
    # the pass with one teacher, which reads the full run's snapshots (run first where only its record is kept).
    # Its teacher bank (speedyrec.distill.bank: news vectors keyed by the weights' checksum) is the full run's when
    # the teacher comes out bit for bit the same: then it is read, not built (a few seconds of the pass)
    over = [*run_overrides(seed, 1, most, quick, settings, "finetune_teachers"), f"distill.from_dir={root / full}"]
    job = run_job_relocated(pass_name(seed), over, root, committed.get(pass_name(seed)), may_run=may_run,
                            stage="finetune_teachers", before_run=teachers_dir, timeout=6 * 3600)
    if job is not None:
        runs[pass_name(seed)] = job
    return runs


def teacher_pass(full: dict, one: dict, most: int) -> dict:
    """The teacher-finetuning pass of a seed, in seconds: measured with one teacher (``one``, the pass_m1 job) and
    with ``most`` (the full run's step); a and b of the line a + b*M through the two (``shared``, ``per_teacher``:
    what they are when the pass costs the teachers' shared work plus an equal part per teacher); teacher 1's AUC
    finetuned alone and in the ``most``-teacher pass (the same teacher up to its dropout masks); and the seconds
    the full run's Stage I spent building its ``most`` teachers' bank (``stage1_bank``)."""
    c1, cm = one["stats"]["stage_seconds"], full["summary"]["seconds"]["finetune_teachers"]
    b = (cm - c1) / (most - 1)
    return {"one": c1, "most": cm, "per_teacher": b, "shared": c1 - b, "stage1_bank": full[BANK],
            "teacher_1_auc": {"alone": one["metrics"]["teacher_1"]["auc"],
                              "in_pass": full["summary"]["models"].get("teacher_1", {}).get("auc")}}


def run_steps(run: dict) -> dict:
    """A run's steps and their seconds: a pipeline's summary, or the one-teacher pass (a stage run alone)."""
    if "summary" in run:
        return run["summary"].get("seconds", {})
    return {"finetune_teachers": run["stats"]["stage_seconds"]}


def row_seconds(run: dict, full: dict, cost: dict, m: int, most: int) -> tuple[dict, bool]:
    """The cost of row ``m`` in seconds (PARTS), from its run, the seed's full run and its teacher pass (``cost``,
    ``teacher_pass``); and whether post-training to snapshot m is prorated by steps (a run made before snapshots
    recorded their seconds) instead of measured."""
    snaps, steps = full["summary"]["posttrain"], full["summary"]["seconds"]
    snap = snaps[m - 1]
    prorated = "seconds" not in snap
    post = steps["posttrain"] * snap["step"] / snaps[-1]["step"] if prorated else snap["seconds"]
    own = run["summary"]["seconds"]
    parts = {"posttrain": post, "stage1": own["distill_posttrain"] - run[BANK],  # the bank: see with_bank
             "teachers": cost["one"] + cost["per_teacher"] * (m - 1),  # measured at 1 and most, the line between
             "stage2": own["distill_finetune"]}
    parts["student"] = parts["teachers"] + parts["stage2"]
    parts["all"] = parts["posttrain"] + parts["stage1"] + parts["student"]
    return parts, prorated


def seed_rows(runs: dict, seed: int, most: int) -> dict:
    """M (str) -> the seed's student metrics, its cost (``seconds``; None without the seed's full run and its
    one-teacher pass) and the run."""
    full, one = runs.get(run_name(most, seed)), runs.get(pass_name(seed))
    cost = teacher_pass(full, one, most) if full and one else None
    rows = {}
    for m in counts(most):
        run = runs.get(run_name(m, seed))
        if run is None:
            continue
        row = {k: run["summary"]["models"]["student"][k] for k in METRICS}
        row["seconds"], row["posttrain_prorated"] = row_seconds(run, full, cost, m, most) if cost else (None, False)
        row["run"] = run_name(m, seed)
        rows[str(m)] = row
    return rows


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(rows: dict, ref: int) -> tuple[dict, dict]:
    """``table``: M -> {metric: mean and std over seeds, seconds: {part: mean and std}, seeds}; ``paired``: M ->
    the difference to row ``ref`` of the same seed, over the seeds that have both (seconds too)."""
    table, paired = {}, {}
    for m, entry in rows.items():
        seeds = entry["seeds"]
        costed = [s for s in seeds.values() if s["seconds"] is not None]
        table[m] = {**{k: _mean_std([s[k] for s in seeds.values()]) for k in METRICS},
                    "seconds": {p: _mean_std([s["seconds"][p] for s in costed]) for p in PARTS} if costed else None,
                    "seeds": list(seeds)}
    base = rows.get(str(ref), {}).get("seeds", {})
    for m, entry in rows.items():
        both = [s for s in entry["seeds"] if s in base]
        if m == str(ref) or not both:
            continue
        mine = entry["seeds"]
        costed = [s for s in both if mine[s]["seconds"] is not None and base[s]["seconds"] is not None]
        paired[m] = {**{k: _mean_std([mine[s][k] - base[s][k] for s in both]) for k in METRICS},
                     "seconds": {p: _mean_std([mine[s]["seconds"][p] - base[s]["seconds"][p] for s in costed])
                                 for p in PARTS} if costed else None,
                     "seeds": both}
    return table, paired


def verdict(table: dict, paired: dict, ref: int) -> list[str]:
    """What agrees with the paper's Figure 2 and what does not, in words, from the paired AUC differences: the
    student "first greatly improves" with M, and beyond M = 4 "only marginal improvement". A difference counts when
    its mean exceeds its spread over seeds, and is marked clear beyond twice it (``clear_mark``)."""
    ms = sorted(int(m) for m in table)
    if not ms:
        return []
    lo, hi = ms[0], ms[-1]
    lines = []

    def spread(d):
        return f" ± {100 * d['auc']['std']:.2f}" if len(d["seeds"]) > 1 else ""

    def clear(d):  # a difference larger than its spread over seeds (one seed: any difference, provisionally)
        return len(d["seeds"]) < 2 or abs(d["auc"]["mean"]) > d["auc"]["std"]

    def mark(d):  # beyond twice its spread: a firm verdict (ablation's and student_gap's rule)
        return clear_mark(d["auc"]["mean"], d["auc"]["std"], len(d["seeds"]))

    up = paired.get(str(lo)) if lo < ref else None
    if up is not None:
        gain = -up["auc"]["mean"]
        word = ("within the spread over seeds: no clear gain (the paper: a large one)" if not clear(up) else
                ("a gain, as in the paper" if gain > 0 else "a loss: disagrees with the paper") + mark(up))
        lines.append(f"- M = {lo} -> {ref}: the student's AUC {100 * gain:+.2f}{spread(up)} points over "
                     f"{len(up['seeds'])} seed(s), {100 * gain / (ref - lo):+.2f} per added teacher: {word}.")
    beyond = paired.get(str(hi)) if hi > ref else None
    if beyond is not None:
        gain = beyond["auc"]["mean"]
        slope = gain / (hi - ref)
        head = (f"- M = {ref} -> {hi}: the student's AUC {100 * gain:+.2f}{spread(beyond)} points over "
                f"{len(beyond['seeds'])} seed(s), {100 * slope:+.2f} per added teacher: ")
        firm = mark(beyond)
        if not clear(beyond):
            word = "within the spread over seeds: marginal at most, as the paper says"
        elif gain < 0:
            word = f"a loss{firm}: more teachers made the student worse; the paper: a marginal gain"
        elif up is not None and -up["auc"]["mean"] > 0 and slope <= -up["auc"]["mean"] / (ref - lo) / 2:
            word = f"a gain{firm}, per teacher at most half the one up to M = {ref}: marginal, as the paper says"
        else:
            word = (f"a gain{firm}, per teacher as large as up to M = {ref} or larger: disagrees with the paper "
                    "(marginal)")
        lines.append(head + word + ".")
    best = max(ms, key=lambda m: table[str(m)]["auc"]["mean"])
    near = [m for m in ms if str(m) in paired and m != ref and not clear(paired[str(m)])]
    lines.append(f"- The highest mean AUC is at M = {best} ({100 * table[str(best)]['auc']['mean']:.2f})"
                 + (f"; within the spread of M = {ref}: M = {', '.join(map(str, near))}." if near else "."))
    cost = {m: table[str(m)]["seconds"] for m in ms if table[str(m)]["seconds"] is not None}
    if lo in cost and hi in cost and hi > lo:
        per = (cost[hi]["student"]["mean"] - cost[lo]["student"]["mean"]) / (hi - lo)
        at = ", ".join(f"{cost[m]['student']['mean'] / 60:.1f} min at M = {m}" for m in sorted({lo, ref, hi}) if m in cost)
        lines.append(f"- Producing the student (teacher finetuning + Stage II) takes {at}: "
                     f"{per / 60:+.1f} min per added teacher; with post-training to snapshot M and Stage I's "
                     f"training, {cost[lo]['all']['mean'] / 60:.1f} min at M = {lo} and "
                     f"{cost[hi]['all']['mean'] / 60:.1f} min at M = {hi}.")
    if any(len(d["seeds"]) < 2 for d in paired.values()):
        lines.append("- Fewer than 2 seeds for some row: no spread to judge a difference by; these words are "
                     "provisional.")
    return lines


def report(per_seed: dict, runs: dict, most: int, info: dict, quick: bool, command: str, name: str,
           seconds: float, settings: list[str] = ()) -> dict:
    """Write ``benchmarks/results/<name>.{json,md,png}`` from ``per_seed`` (seed -> seed_rows) and the runs."""
    ref = reference(most)
    rows = {str(m): {"seeds": {s: r[str(m)] for s, r in per_seed.items() if str(m) in r}} for m in counts(most)}
    rows = {m: e for m, e in rows.items() if e["seeds"]}
    table, paired = summarize(rows, ref)
    prorated = sorted({s for e in rows.values() for s, r in e["seeds"].items() if r["posttrain_prorated"]})
    passes = {s: teacher_pass(runs[run_name(most, int(s))], runs[pass_name(int(s))], most) for s in sorted(per_seed)
              if run_name(most, int(s)) in runs and pass_name(int(s)) in runs}
    payload = {"machine": info, "quick": quick, "command": command, "settings": list(settings),
               "seeds": sorted(per_seed), "counts": counts(most),
               "reference": ref, "rows": rows, "table": table, "paired": paired,
               "seconds": {n: run_steps(r) for n, r in sorted(runs.items())},
               "total": sum(r["process_seconds"] for r in runs.values()), "wall_seconds_this_invocation": seconds,
               "teacher_pass": passes,
               "teachers_cost": f"the finetuning pass measured with 1 and {most} teachers, the line between for the "
                                "others",
               "verdict": verdict(table, paired, ref), "runs": runs}

    def cell(v, many, scale=100.0, sign=""):
        return f"{scale * v['mean']:{sign}.2f}" + (f" ± {scale * v['std']:.2f}" if many else "")

    def minutes(v, many, sign=""):
        return "" if v is None else cell(v, many, 1 / 60, sign)

    quality = [[m, *[cell(t[k], len(t["seeds"]) > 1) for k in METRICS],
                *[minutes(t["seconds"] and t["seconds"][p], len(t["seeds"]) > 1) for p in ("teachers", "stage2",
                                                                                         "student")],
                len(t["seeds"])] for m, t in table.items()]
    diffs = [[f"M = {m} - M = {ref}", len(d["seeds"]), *[cell(d[k], len(d["seeds"]) > 1, sign="+") for k in METRICS],
              minutes(d["seconds"] and d["seconds"]["student"], len(d["seeds"]) > 1, "+")] for m, d in paired.items()]
    parts = [[m, *[minutes(t["seconds"] and t["seconds"][p], len(t["seeds"]) > 1) for p in PARTS]]
             for m, t in table.items()]
    seeds = payload["seeds"]
    auc = [[s, *[f"{100 * per_seed[s][m]['auc']:.2f}" if m in per_seed[s] else "" for m in rows]] for s in seeds]
    pass_rows = [[s, f"{p['one'] / 60:.1f}", f"{p['most'] / 60:.1f}", f"{p['shared'] / 60:.1f}",
                  f"{p['per_teacher'] / 60:.1f}", f"{100 * p['teacher_1_auc']['alone']:.2f}",
                  "" if p["teacher_1_auc"]["in_pass"] is None else f"{100 * p['teacher_1_auc']['in_pass']:.2f}",
                  f"{p['stage1_bank'] / 60:.1f}"]
                 for s, p in passes.items()]
    encoder = "a tiny random encoder (--quick)" if quick else \
        "the encoder these settings give" if settings else "all-MiniLM-L6-v2"
    where = f"these settings: {' '.join(f'`{o}`' for o in settings)}" if settings else "the synthetic default"
    md = [f"# Teacher count: Tiny-NewsRec's Figure 2 on {where}\n",
          f"Each row M is the {'' if settings else '2-layer '}student of {encoder} distilled from the first M of {most} post-training "
          f"snapshots and their finetuned teachers (`distill.teachers=M`; every M < {most} links the {most}-teacher "
          "run of its seed). Quality: mean ± standard deviation over seeds, in points (x100). Cost: minutes. The "
          "teachers train together in one pass. The pass is "
          f"**measured** with 1 teacher (`stage=finetune_teachers distill.teachers=1`) and with {most} (the "
          f"{most}-teacher run's step), side by side in one invocation; M = 2..{most - 1} read the straight line "
          "a + b·M between them (table below), which is exact when the pass costs the work the teachers share (the "
          "frozen bottom layers run once for all, the data, batching and caching) plus an equal part per teacher. "
          "Stage II is measured in each row's run.\n",
          md_table(["M", "AUC", "MRR", "nDCG@5", "nDCG@10", "teachers (min)", "Stage II (min)",
                    "teachers + Stage II (min)", "seeds"], quality),
          f"\nPaired by seed (a seed's rows share its post-training, teachers and data order), the difference to "
          f"M = {ref} (the paper's choice{'' if ref == REFERENCE else '; --quick runs fewer'}) in points; cost in "
          "minutes:\n",
          md_table(["comparison", "seeds", "AUC", "MRR", "nDCG@5", "nDCG@10", "teachers + Stage II (min)"], diffs),
          "\nAUC of each seed:\n", md_table(["seed", *[f"M = {m}" for m in rows]], auc),
          "\nEvery part of the cost (min): post-training up to snapshot M (the seconds elapsed when it was kept: what "
          f"a run keeping M snapshots takes), Stage I and Stage II (measured per row), the teachers (measured at 1 "
          f"and {most}, the line between). Stage I is its training alone: its teacher bank (the post-trained "
          f"snapshots' news vectors) is built once per seed, by the M = {most} run, and read by the other rows, so "
          f"it is set apart (table below, with {most} teachers; fewer cost less) and not in \"all four\":\n",
          md_table(["M", *PARTS.values()], parts),
          f"\nThe teachers' finetuning pass of each seed (min), measured with 1 and with {most} teachers; a and b of "
          f"the line a + b·M through the two; teacher 1's dev AUC finetuned alone and in the {most}-teacher pass "
          f"(the same teacher up to its dropout masks, which the teachers of one pass draw from one random stream); "
          f"and Stage I's teacher bank of the {most} post-trained snapshots (min):\n",
          md_table(["seed", "1 teacher", f"{most} teachers", "a", "b", "teacher 1 alone (AUC)",
                    f"teacher 1 of {most} (AUC)", f"Stage I's bank, {most} teachers"], pass_rows)]
    if over := {s: f"{p['most'] / p['one']:.1f}x" for s, p in passes.items() if p["shared"] < 0}:
        md.append(f"\nSeed(s) {', '.join(over)}: a < 0, i.e. {most} teachers took more than {most} times the pass of "
                  f"one ({', '.join(over.values())}): the pass "
                  "grows faster than in proportion to M, and the rows between read the chord through the two "
                  "measured ends, not a measured cost.\n")
    stage2 = {int(m): t["seconds"]["stage2"]["mean"] for m, t in table.items() if t["seconds"] is not None}
    if most in stage2 and len(stage2) > 1:
        others = [v / 60 for m, v in stage2.items() if m != most]
        rest = statistics.mean(others)
        if stage2[most] / 60 > 1.1 * rest:
            md.append(f"\nStage II of M = {most} took {stage2[most] / 60:.2f} min against {rest:.2f} (the mean "
                      f"of the other rows, which span {min(others):.2f} to {max(others):.2f}), for the same steps "
                      f"over the same data (a teacher more adds a lookup in the bank per news): it runs in the "
                      f"process that post-trained and finetuned the teachers, the others in a fresh one after Stage "
                      f"I. Part of the M = {most} row's cost is that process's state, not its last teacher.\n")
    if prorated:
        md.append(f"\nSeeds {', '.join(prorated)}: post-training to snapshot M prorated by its steps (their runs "
                  "predate the snapshots' recorded seconds).\n")
    md += ["\n## Verdict\n",
           "Generated from the numbers above; the paper (Feeds data, a 4-layer student of UniLM): the student first "
           "improves greatly with M, and only marginally beyond M = 4, chosen as the balance of quality and the "
           "teachers' training cost. A difference counts when its mean, paired by seed, exceeds its spread over "
           "seeds (with 3 seeds a weak test), and is marked clear beyond twice its spread.\n", *payload["verdict"],
           "\n## How it was measured\n",
           f"Commit {info.get('commit') or 'unknown'}; {info['device']}, torch {info['torch']}, "
           f"{info.get('threads')} threads. Command: `{command}`. Wall times are of a machine that may be shared: "
           f"they are seconds of each run's own steps. All jobs these rows read took {payload['total'] / 60:.1f} min "
           f"(this invocation: {seconds / 60:.1f} min; kept runs are reused, not run again). Each run's steps (s):\n",
           md_table(["run", "steps"], [[n, ", ".join(f"{k} {v:.0f}" for k, v in s.items())]
                                       for n, s in payload["seconds"].items()])]
    write_results(name, payload, "\n".join(md), plot=lambda path: _plot(path, payload))
    print("\n".join(md), flush=True)
    return payload


def _plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    table = d["table"]
    ms = [int(m) for m in table]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for seed in d["seeds"]:
        have = [m for m in ms if seed in d["rows"][str(m)]["seeds"]]
        left.plot(have, [100 * d["rows"][str(m)]["seeds"][seed]["auc"] for m in have], color="#dd8452", alpha=0.3,
                  marker=".", linewidth=0.8)
    left.errorbar(ms, [100 * table[str(m)]["auc"]["mean"] for m in ms],
                  yerr=[100 * table[str(m)]["auc"]["std"] for m in ms], color="#dd8452", marker="o", capsize=4,
                  label="mean ± std (faint: each seed)")
    left.set_ylabel("student's dev AUC (x100)")
    left.set_title("Quality")
    costed = [m for m in ms if table[str(m)]["seconds"] is not None]
    for part, style, label in (("student", "-", "teacher finetuning + Stage II"),
                               ("all", "--", "+ post-training to snapshot M + Stage I's training")):
        right.errorbar(costed, [table[str(m)]["seconds"][part]["mean"] / 60 for m in costed],
                       yerr=[table[str(m)]["seconds"][part]["std"] / 60 for m in costed], color="#4c72b0",
                       linestyle=style, marker="o", capsize=4, label=label)
    right.set_ylabel("minutes")
    right.set_title("Cost of producing the student")
    for ax in (left, right):
        ax.axvline(d["reference"], color="#8c8c8c", linestyle=":", linewidth=1,
                   label=f"M = {d['reference']}, the paper's choice" if d["reference"] == REFERENCE else None)
        ax.set_xticks(ms)
        ax.set_xlabel("teachers M")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = experiment_parser("benchmarks.teacher_count", __doc__, "quality's tiny settings, M = 1..3: checks the harness")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting of every run (e.g. data.format=mind); needs --name")
    p.add_argument("--name", default="", help="the results file's name (default teacher_count[_quick])")
    a = p.parse_args(argv)
    if a.set and not a.name:
        p.error("--set makes another table: name its results file with --name")
    t0 = time.perf_counter()
    most = QUICK_MOST if a.quick else MOST
    name = a.name or ("teacher_count_quick" if a.quick else "teacher_count")
    command = "python -m benchmarks.teacher_count " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine()
    committed = committed_runs(name, a.fresh)
    per_seed, runs, payload = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in seed_list(a.seeds, a.quick):
            got = seed_runs(root, seed, most, a.quick, committed, not a.kept_only, a.set)
            if got:
                runs.update(got)
                per_seed[str(seed)] = seed_rows(got, seed, most)
                # rewritten after every seed: an interrupted invocation keeps what it measured
                payload = report(per_seed, runs, most, info, a.quick, command, name, time.perf_counter() - t0,
                                 a.set)
    if payload is None:
        raise SystemExit(f"benchmarks.teacher_count: no run of seeds {a.seeds or 'default'} is kept in {root} or "
                         "recorded")
    return payload


if __name__ == "__main__":
    main()
