"""What M teachers cost: teacher finetuning and Stage II distillation, the speedyrec way against the naive way.

``python -m benchmarks.multiteacher [--quick] [--teachers M] [--finetune-steps S] [--stage2-steps S] [--naive-steps S]``

Every run is a fresh ``speedyrec.train`` process on the synthetic default with all-MiniLM-L6-v2 teachers and
its first 2 layers as the student; costs are the training loop's seconds (stats.json ``wall_seconds``).

- Teacher finetuning, speedyrec: ``stage=finetune_teachers`` with the first M post-training snapshots, one
  engine pass for all M (shared frozen layers computed once per news, each teacher's own frozen layer cached
  per teacher, only the top 2 layers of each run per step). Naive: each teacher finetuned on its own, its
  whole PLM run at every step (``engine.frozen_cache=false``); M teachers cost the sum of M such runs.
- Stage II, speedyrec: ``stage=distill_finetune`` reading the teachers' news vectors from a bank that the run
  builds itself (its build time is added to the cost); the student without teachers is ``stage=finetune`` of
  the same 2-layer student. Naive: every teacher's whole PLM encodes the batch's news in every student step
  (``distill.bank=false``).

Teacher finetuning is measured over the first --finetune-steps steps of the epoch (its cost per step is nearly
steady: the frozen-layer caches fill in the first steps and take a small share of the cost); Stage II and the
student alone train a full epoch unless --stage2-steps, because the bank is built once per stage and must be
charged against the whole stage. Naive runs train --naive-steps and their cost per step is multiplied by the
steps of the speedyrec run they stand beside (no naive run has a cache that warms up, so its cost per step is
steady). The embedding cache is off in every run.
Teachers' weights do not change the cost: they come from a few post-training and finetuning steps.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import machine, md_table, run_job, write_results
from benchmarks.quality import TINY6

BASE = ["data.synthetic_users=2000", "model.encoder=auto", "eval.max_impressions=20", "engine.cache=false"]
QUICK_BASE = ["data.synthetic_users=300", *TINY6, "eval.max_impressions=20", "engine.cache=false"]


def _link(dst: Path, src: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve())


def prepare(root: Path, m_max: int, base: list[str]) -> dict[str, Path]:
    """Post-training snapshots, finetuned teachers and a Stage I student (a few steps each), then one from_dir
    folder per M holding the first M of each, and one per teacher holding only it."""
    prep = root / "prep"
    run_job("prep", [*base, "stage=posttrain", f"posttrain.teachers={m_max}", "posttrain.snapshot_after=2",
                     "posttrain.snapshot_every=2", "posttrain.holdout=50"], root, stage="posttrain")
    run_job("prep", [*base, "stage=finetune_teachers", "train.max_steps=2"], root, stage="finetune_teachers")
    run_job("prep", [*base, "stage=distill_posttrain", "train.max_steps=2", "distill.stage1_epochs=1"], root,
            stage="distill_posttrain")
    dirs = {}
    for m in range(1, m_max + 1):
        d = root / f"teachers_{m}"
        for k in range(1, m + 1):
            _link(d / "posttrain/snapshots" / f"teacher_{k}.pt", prep / "posttrain/snapshots" / f"teacher_{k}.pt")
            _link(d / "finetune_teachers/teachers" / f"teacher_{k}.pt",
                  prep / "finetune_teachers/teachers" / f"teacher_{k}.pt")
        _link(d / "distill_posttrain/student.pt", prep / "distill_posttrain/student.pt")
        dirs[f"first_{m}"] = d
        only = root / f"only_{m}"
        _link(only / "posttrain/snapshots" / f"teacher_{m}.pt", prep / "posttrain/snapshots" / f"teacher_{m}.pt")
        dirs[f"only_{m}"] = only
    return dirs


def cost(run: dict) -> dict:
    s = run["stats"]
    return {"loop_seconds": s["wall_seconds"], "steps": s["steps"], "clicks_trained": s["clicks_trained"],
            "bank_seconds": s.get("bank_seconds", 0.0), "process_seconds": run["process_seconds"],
            "command": run["command"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.multiteacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny random encoder, 300 users, M up to 2, 6 steps per "
                   "speedyrec run and 3 per naive run: checks the harness")
    p.add_argument("--teachers", type=int, default=None, help="largest M (default 4; --quick: 2)")
    p.add_argument("--finetune-steps", type=int, default=None, help="steps per teacher-finetuning run (default 30)")
    p.add_argument("--stage2-steps", type=int, default=None, help="steps per Stage II / student run (default: an epoch)")
    p.add_argument("--naive-steps", type=int, default=None, help="steps per naive run (default 12)")
    p.add_argument("--report", metavar="JSON", help="only re-render the tables from a results file's runs")
    a = p.parse_args(argv)
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        return report(saved["runs"], max(f["teachers"] for f in saved["finetune"]), 0 if saved["stage2_full_epoch"]
                      else saved["stage2_steps"], saved["naive_steps"], saved["machine"], saved["quick"])
    ft_steps = a.finetune_steps or (6 if a.quick else 30)
    s2_steps = a.stage2_steps if a.stage2_steps is not None else (6 if a.quick else 0)
    naive_steps = a.naive_steps or (3 if a.quick else 12)
    m_max = a.teachers or (2 if a.quick else 4)
    base = QUICK_BASE if a.quick else BASE
    ft_limit = [f"train.max_steps={ft_steps}"]
    limit = [f"train.max_steps={s2_steps}"] if s2_steps else []
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = prepare(root, m_max, base)
        runs: dict[str, dict] = {}
        for m in range(1, m_max + 1):
            runs[f"finetune_ours_{m}"] = cost(run_job(f"finetune_ours_{m}", [
                *base, "stage=finetune_teachers", f"distill.from_dir={dirs[f'first_{m}']}", *ft_limit], root,
                stage="finetune_teachers"))
            runs[f"finetune_naive_single_{m}"] = cost(run_job(f"finetune_naive_{m}", [
                *base, "stage=finetune_teachers", f"distill.from_dir={dirs[f'only_{m}']}", "engine.frozen_cache=false",
                f"train.max_steps={naive_steps}"], root, stage="finetune_teachers"))
        runs["student"] = cost(run_job("student", [*base, "stage=finetune", "model.layers=2", "model.freeze_layers=0",
                                                   *limit], root))
        for m in range(1, m_max + 1):
            runs[f"stage2_ours_{m}"] = cost(run_job(f"stage2_ours_{m}", [
                *base, "stage=distill_finetune", f"distill.from_dir={dirs[f'first_{m}']}",
                f"distill.bank_dir={root / f'banks_{m}'}", *limit], root, stage="distill_finetune"))
            runs[f"stage2_naive_{m}"] = cost(run_job(f"stage2_naive_{m}", [
                *base, "stage=distill_finetune", f"distill.from_dir={dirs[f'first_{m}']}", "distill.bank=false",
                f"train.max_steps={naive_steps}"], root, stage="distill_finetune"))
    return report(runs, m_max, s2_steps, naive_steps, info, a.quick)


def report(runs: dict, m_max: int, s2_steps: int, naive_steps: int, info: dict, quick: bool) -> dict:
    ours_steps = runs["finetune_ours_1"]["steps"]
    per_step = lambda r: r["loop_seconds"] / max(r["steps"], 1)
    one = runs["finetune_ours_1"]["loop_seconds"]
    student = runs["student"]["loop_seconds"]
    finetune, stage2 = [], []
    for m in range(1, m_max + 1):
        ours = runs[f"finetune_ours_{m}"]["loop_seconds"]
        naive = sum(per_step(runs[f"finetune_naive_single_{k}"]) for k in range(1, m + 1)) * ours_steps
        finetune.append({"teachers": m, "ours_seconds": ours, "naive_seconds": naive, "ours_over_one": ours / one,
                         "naive_over_one": naive / one, "naive_over_ours": naive / ours})
        r = runs[f"stage2_ours_{m}"]
        s2 = r["loop_seconds"] + r["bank_seconds"]
        naive = per_step(runs[f"stage2_naive_{m}"]) * runs["student"]["steps"]
        stage2.append({"teachers": m, "ours_seconds": s2, "ours_loop_seconds": r["loop_seconds"],
                       "bank_seconds": r["bank_seconds"], "naive_seconds": naive, "ours_over_student": s2 / student,
                       "ours_loop_over_student": r["loop_seconds"] / student, "naive_over_student": naive / student,
                       "naive_over_ours": naive / s2})
    s2_window = f"{runs['student']['steps']} steps" + (" (a full epoch)" if not s2_steps else "")
    conventional_one = per_step(runs["finetune_naive_single_1"]) * ours_steps
    payload = {
        "finetune_m4_over_one": next((f["ours_over_one"] for f in finetune if f["teachers"] == 4), None),
        # the same M = 4 run against one teacher finetuned the conventional way (its whole PLM at every step)
        "finetune_m4_over_one_conventional": next((f["ours_seconds"] / conventional_one for f in finetune
                                                   if f["teachers"] == 4), None),
        "stage2_m4_over_student": next((s["ours_over_student"] for s in stage2 if s["teachers"] == 4), None),
        "machine": info, "quick": quick, "finetune_steps": ours_steps, "stage2_steps": runs["student"]["steps"],
        "stage2_full_epoch": not s2_steps, "naive_steps": naive_steps,
        "student_seconds": student, "one_teacher_seconds": one, "finetune": finetune, "stage2": stage2, "runs": runs,
    }
    fmt = lambda x: f"{x:.2f}x"
    md = ["# Multi-teacher cost: speedyrec vs the naive way\n",
          f"Device: {info['device']}, torch {info['torch']}. Synthetic default (2,000 users), all-MiniLM-L6-v2 "
          f"teachers (top 2 of 6 layers finetuned), its first 2 layers as the student. Costs are training-loop "
          f"seconds: teacher finetuning over its first {ours_steps} steps, Stage II and the student alone over "
          f"{s2_window}; naive runs trained {naive_steps} steps, their cost per step times the same steps. The "
          f"embedding cache is off everywhere. Command: `python -m benchmarks.multiteacher"
          f"{' --quick' if quick else ''}`.\n",
          "## Finetuning M teachers\n",
          f"One teacher alone: {one:.0f} s with speedyrec, {conventional_one:.0f} s the conventional way (its whole "
          f"PLM at every step). A teacher's step is mostly its own top layers' forward and backward (82% of one "
          f"teacher's first 20 steps in a py-spy profile; filling the frozen-layer caches took 15%), which no "
          f"sharing removes: M teachers cost about M times one.\n",
          md_table(["M", "speedyrec s", "vs one teacher", "naive s", "naive vs one teacher", "naive / speedyrec"],
                   [[f["teachers"], f"{f['ours_seconds']:.0f}", fmt(f["ours_over_one"]), f"{f['naive_seconds']:.0f}",
                     fmt(f["naive_over_one"]), fmt(f["naive_over_ours"])] for f in finetune]),
          "\n## Stage II: the student with M teachers\n",
          f"The same student without teachers: {student:.0f} s. Speedyrec's cost includes building the bank.\n",
          md_table(["M", "speedyrec s (loop + bank)", "vs student", "loop only vs student", "naive s",
                    "naive vs student", "naive / speedyrec"],
                   [[s["teachers"], f"{s['ours_loop_seconds']:.0f} + {s['bank_seconds']:.0f}",
                     fmt(s["ours_over_student"]), fmt(s["ours_loop_over_student"]), f"{s['naive_seconds']:.0f}",
                     fmt(s["naive_over_student"]), fmt(s["naive_over_ours"])] for s in stage2])]
    name = "multiteacher_quick" if quick else "multiteacher"
    write_results(name, payload, "\n".join(md), plot=lambda path: _plot(path, finetune, stage2, one, student))
    print("\n".join(md))
    return payload


def _plot(path, finetune, stage2, one, student) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, base, title, unit in ((axes[0], finetune, one, "Finetuning M teachers", "one teacher"),
                                        (axes[1], stage2, student, "Stage II with M teachers", "student alone")):
        m = [r["teachers"] for r in rows]
        ax.plot(m, [r["ours_seconds"] / base for r in rows], "o-", label="speedyrec")
        ax.plot(m, [r["naive_seconds"] / base for r in rows], "s--", label="naive")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("teachers M")
        ax.set_ylabel(f"cost / {unit}")
        ax.set_title(title)
        ax.set_xticks(m)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
