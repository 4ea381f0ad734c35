"""Speedup of the SpeedyFeed workflow over the typical workflow, as time to quality, measured in one run.

The synthetic default data (2,000 users), the 2-layer MiniLM student (all layers trained), one process.
Both workflows get the same learning-rate sweep (multiples of the defaults), the same cap on training time,
and periodic dev evaluations on the same impressions (evaluation time is not training time). Each run
stops when its dev AUC has not improved for ``patience`` evaluations, or at the cap. From the best run of
each workflow:

- (c) the headline: training seconds to reach the typical workflow's best dev AUC;
- (a) cost per training target (targets/s; the workflows' targets differ, see the table) and, on identical
  targets, against the typical workflow trained on every click of the user sequences;
- (b) time for one epoch of the same log (at the measured rate);
- (d) dev AUC at equal training time, and each workflow's best dev AUC.

Then: ``engine.negatives`` 1 against 4 and a smaller token budget (each the headline speedyfeed run with that one
setting changed, over its first ``negatives_cap`` seconds), and the cumulative ablation
(typical -> + centralized encoding and dynamic batching -> + cache -> + autoregressive loss [-> + BusLM]) in
targets/s, once with titles only and once with title, abstract and body.

    python -m benchmarks.speedup [--quick] [--out DIR] [--cap SECONDS] [--lrs 1,4]

``--out`` keeps every run (``DIR/<run>/job.json``); a second call with the same ``--out`` reuses the runs
already finished, so an interrupted benchmark continues. Full mode takes about 2.5 hours here (measured: the
typical workflow's epoch alone is about 85 minutes; the sweep, 2 learning rates x 2 workflows x an 8-minute cap,
about 35; speedyfeed's epochs, the negatives and token-budget runs and the ablations the rest).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import machine, md_table, run_job_kept, write_results
from speedyrec.config import Config, load_config

STUDENT = ["model.encoder=auto", "model.layers=2", "model.freeze_layers=0"]
TINY = ["model.encoder=random:hidden=32,layers=2,heads=2,intermediate=64", "model.vocab_size=800"]
LONG_TEXT = ["data.title_tokens=32", "data.abstract_tokens=64", "data.body_tokens=128"]
WORKFLOWS = ("typical", "speedyfeed")

# full mode / quick mode (a tiny random encoder on 300 users: checks the harness, says nothing about speed)
FULL = {"users": 2000, "model": STUDENT, "cap": 480.0, "every": {"typical": 60.0, "speedyfeed": 20.0},
        "patience": {"typical": 3, "speedyfeed": 5}, "negatives_cap": 240.0, "ablation_steps": 10, "budgets": [5000],
        "typical_ablation_steps": 3, "eval": [], "epochs": {"typical": 1, "speedyfeed": 2}}
QUICK = {"users": 300, "model": TINY, "cap": 20.0, "every": {"typical": 5.0, "speedyfeed": 2.0},
         "patience": {"typical": 3, "speedyfeed": 3}, "negatives_cap": 8.0, "ablation_steps": 3, "budgets": [4000],
         "typical_ablation_steps": 2, "eval": ["eval.max_impressions=200"],
         "epochs": {"typical": 1, "speedyfeed": 2}}


def default_negatives() -> int:
    """engine.negatives of a default finetune run (``auto`` resolved)."""
    return load_config(overrides=["stage=finetune"]).engine.negatives


def lr_overrides(mult: float) -> list[str]:
    t = Config().train
    return [f"train.lr={t.lr * mult:g}", f"train.encoder_lr={t.encoder_lr * mult:g}"]


def best_auc(job: dict) -> float:
    return max(p["auc"] for p in job["curve"])


def seconds_to(job: dict, target: float) -> float | None:
    """Training seconds at the first dev evaluation with AUC >= target (None: never reached)."""
    for p in job["curve"]:
        if p["auc"] >= target:
            return p["train_seconds"]
    return None


def target_auc(quick: bool, results: Path) -> float | None:
    """The typical workflow's best dev AUC in this benchmark's results (same mode) in ``results``: the quality
    level the other benchmarks time their runs to."""
    path = results / ("speedup_quick.json" if quick else "speedup.json")
    return json.loads(path.read_text())["target_auc"] if path.exists() else None


def auc_at(job: dict, seconds: float) -> float | None:
    """Dev AUC of the last evaluation made within ``seconds`` of training."""
    within = [p for p in job["curve"] if p["train_seconds"] <= seconds + 1e-6]
    return within[-1]["auc"] if within else None


def rate(job: dict) -> float:
    return job["stats"]["clicks_per_second"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="benchmarks.speedup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users: checks the harness")
    ap.add_argument("--out", default="", help="keep the runs here and reuse finished ones (default: a temporary folder)")
    ap.add_argument("--cap", type=float, default=None, help="training seconds per run, both workflows")
    ap.add_argument("--lrs", default="1,4", help="learning-rate multiples of the defaults, swept for both workflows")
    a = ap.parse_args(argv)
    mode = dict(QUICK if a.quick else FULL)
    if a.cap:
        mode["cap"] = a.cap
    mults = [float(m) for m in a.lrs.split(",")]
    base = [f"data.synthetic_users={mode['users']}", *mode["model"], *mode["eval"]]
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)

        def curve_run(name, workflow, mult, cap, *extra):  # stopped by time: no planned length to decay over
            return run_job_kept(name, base + [f"train.workflow={workflow}", *lr_overrides(mult), "train.epochs=100",
                                              "train.lr_schedule=constant",
                                              f"train.max_seconds={cap:g}", f"eval.every_seconds={mode['every'][workflow]:g}",
                                              f"eval.patience={mode['patience'][workflow]}", *extra], root, timeout=4 * 3600)

        def speed_run(name, overrides, steps):
            return run_job_kept(name, base + [f"train.max_steps={steps}", "eval.max_impressions=1", *overrides], root)

        sweep = {wf: {m: curve_run(f"{wf}_lr{m:g}", wf, m, mode["cap"]) for m in mults} for wf in WORKFLOWS}
        best_mult = {wf: max(mults, key=lambda m: best_auc(sweep[wf][m])) for wf in WORKFLOWS}
        sf_mult = best_mult["speedyfeed"]
        # each workflow's best learning rate, trained for its planned epochs of the log with the default schedule
        # (a linear decay over them): the typical workflow one (the sweep's cap stops it at a tenth of it),
        # speedyfeed the epochs benchmarks.tune planned (its epoch is ~10x shorter). The headline compares these
        def planned(wf):
            return base + [f"train.workflow={wf}", *lr_overrides(best_mult[wf]), f"train.epochs={mode['epochs'][wf]}",
                           f"eval.every_seconds={mode['every'][wf]:g}"]

        full = {wf: run_job_kept(f"{wf}_lr{best_mult[wf]:g}_epochs{mode['epochs'][wf]}", planned(wf), root,
                                 timeout=6 * 3600) for wf in WORKFLOWS}
        typ, sf = full["typical"], full["speedyfeed"]
        target = best_auc(typ)
        t_typ, t_sf = seconds_to(typ, target), seconds_to(sf, target)

        # (a) on identical targets: the typical workflow trained on every click of the user sequences
        typ_seq = speed_run("typical_sequence_targets", ["train.workflow=typical", "train.typical_targets=sequence",
                                                         *lr_overrides(best_mult["typical"])], mode["typical_ablation_steps"])
        # speedyfeed's headline run with one setting changed, stopped after the first negatives_cap seconds: the same
        # learning-rate schedule as the headline run over that time, so their first seconds compare like for like

        def capped_run(name, extra):
            return run_job_kept(name, [*planned("speedyfeed"), f"train.max_seconds={mode['negatives_cap']:g}", extra],
                                root, timeout=4 * 3600)

        # negatives per click: the default (benchmarks.tune chose it) against the other of 1 and 4
        neg_default = default_negatives()
        neg_other_n = 1 if neg_default != 1 else 4
        neg_other = capped_run(f"speedyfeed_negatives{neg_other_n}", f"engine.negatives={neg_other_n}")
        # the cumulative ablation, titles only and long text
        ablation = {}
        for text, fields in (("titles", []), ("long text", LONG_TEXT)):
            # the typical workflow's batch of 32 clicks x 55 news of long text does not fit in 24 GiB: 8 clicks there
            typical = ["train.workflow=typical"] + (["train.batch_size=8"] if fields else [])
            steps = [("typical" + (" (8 clicks per batch)" if fields else ""), typical, mode["typical_ablation_steps"]),
                     ("+ centralized encoding, dynamic batching",
                      ["train.workflow=speedyfeed", "engine.cache=false", "engine.autoregressive=false"], None),
                     ("+ cache", ["train.workflow=speedyfeed", "engine.autoregressive=false"], None),
                     ("+ autoregressive loss", ["train.workflow=speedyfeed"], None)]
            if fields:
                steps.append(("+ BusLM", ["train.workflow=speedyfeed", "engine.buslm=true"], None))
            rows = []
            for label, extra, n in steps:
                name = f"ablation_{text.replace(' ', '_')}_{len(rows)}"
                rows.append((label, speed_run(name, [*fields, *extra, *lr_overrides(sf_mult)], n or mode["ablation_steps"])))
            ablation[text] = rows
        # the engine's defaults, tuned for time to quality: token budgets per step against the default
        budgets = {b: capped_run(f"speedyfeed_budget{b}", f"engine.token_budget={b}") for b in mode.get("budgets", [])}

    epoch = {wf: j["stats"]["clicks_in_data"] / rate(j) for wf, j in (("typical", typ), ("speedyfeed", sf))}
    t_equal = min(typ["curve"][-1]["train_seconds"], sf["curve"][-1]["train_seconds"])
    payload = {
        "machine": info, "quick": a.quick, "mode": {k: v for k, v in mode.items()}, "lr_multiples": mults,
        "per_target_speedup": rate(sf) / rate(typ),
        "per_target_speedup_same_targets": rate(sf) / rate(typ_seq),
        "epoch_speedup": epoch["typical"] / epoch["speedyfeed"],
        "time_to_auc_speedup": (t_typ / t_sf) if t_sf else None,
        "target_auc": target, "seconds_to_target": {"typical": t_typ, "speedyfeed": t_sf},
        # a secondary figure, because a best of many noisy evaluations is a high bar: time to within 0.5 AUC points
        "near_target": _near(typ, sf, target - 0.005),
        "best_auc": {"typical": target, "speedyfeed": best_auc(sf)},
        "auc_at_equal_time": {"seconds": t_equal, "typical": auc_at(typ, t_equal), "speedyfeed": auc_at(sf, t_equal)},
        "epoch_seconds": epoch, "best_lr_multiple": best_mult, "headline_lr_multiple": sf_mult,
        # where in its epoch each workflow reached its best: near the end means it was still improving
        "best_at_epoch_fraction": {wf: _best_point(j)["train_seconds"] / j["curve"][-1]["train_seconds"]
                                   for wf, j in full.items()},
        "default_negatives": neg_default,
        "negatives": {str(neg_default): _window_summary(sf, mode["negatives_cap"], target),
                      str(neg_other_n): _window_summary(neg_other, mode["negatives_cap"], target)},
        "runs": {f"{wf}_lr{m:g}": sweep[wf][m] for wf in WORKFLOWS for m in mults},
        "epoch_runs": full,
        "typical_sequence_targets": typ_seq, f"speedyfeed_negatives{neg_other_n}": neg_other,
        "token_budgets": {"default": Config().engine.token_budget,
                          **{str(b): {**_window_summary(j, mode["negatives_cap"], target), "steps": j["stats"]["steps"]}
                             for b, j in budgets.items()}},
        "speedyfeed_budgets": {str(b): j for b, j in budgets.items()},
        "ablation": {text: [{"variant": label, **job} for label, job in rows] for text, rows in ablation.items()},
    }
    md = report(payload, typ, sf, typ_seq, ablation)

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(12, 4))
        for wf, color in (("typical", "grey"), ("speedyfeed", "tab:blue")):
            for m in mults:  # the sweep, dotted; the epoch run of the best learning rate, solid
                c = sweep[wf][m]["curve"]
                ax[0].plot([max(p["train_seconds"], 1.0) for p in c], [p["auc"] for p in c], color=color, ls=":",
                           lw=0.8, label=f"{wf}, lr x{m:g} (sweep)")
            c = full[wf]["curve"]
            ax[0].plot([max(p["train_seconds"], 1.0) for p in c], [p["auc"] for p in c], color=color, ls="-",
                       marker=".", label=f"{wf}, lr x{best_mult[wf]:g}, {mode['epochs'][wf]} epoch(s)")
        ax[0].axhline(target, color="tab:red", lw=0.8, label="typical's best")
        ax[0].set_xscale("log")
        ax[0].set_xlabel("training seconds (log)")
        ax[0].set_ylabel("dev AUC")
        ax[0].legend(fontsize=7)
        labels, values = [], []
        for text, rows in ablation.items():
            for label, job in rows:
                labels.append(f"{text}: {label}")
                values.append(rate(job))
        ax[1].barh(labels, values, color=["grey" if "typical" in lab else "tab:blue" for lab in labels])
        ax[1].set_xscale("log")
        ax[1].set_xlabel("training targets / second (log)")
        ax[1].invert_yaxis()
        ax[1].tick_params(axis="y", labelsize=7)
        head = payload["time_to_auc_speedup"]
        fig.suptitle(f"time to the typical workflow's best dev AUC: "
                     f"{'%.1fx faster' % head if head else 'not reached'} ({info['device']})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    write_results("speedup_quick" if a.quick else "speedup", payload, md, plot)
    print(md)
    return payload


def _near(typ: dict, sf: dict, level: float) -> dict:
    t, s = seconds_to(typ, level), seconds_to(sf, level)
    return {"auc": level, "typical": t, "speedyfeed": s, "speedup": (t / s) if t and s else None}


def _best_point(job: dict) -> dict:
    return max(job["curve"], key=lambda p: p["auc"])


def _stopped_by(name: str, s: dict, mode: dict) -> str:
    if name.endswith("_epoch"):
        return f"{s['clicks_trained'] / s['clicks_in_data']:.0f} epoch(s)"
    return "patience" if s["wall_seconds"] < mode["cap"] - 1 else "cap"


def _window_summary(job: dict, cap: float, target: float) -> dict:
    """A curve run over its first ``cap`` training seconds: rate, best and last AUC, time to the target within them
    (None when the run reached it only later: the default's run is the full headline run, the others stop at cap)."""
    within = [p["auc"] for p in job["curve"] if p["train_seconds"] <= cap + 1e-6]
    t = seconds_to(job, target)
    return {"targets_per_second": rate(job), "best_auc_within_cap": max(within) if within else None,
            "auc_at_cap": auc_at(job, cap), "seconds_to_target": t if t is not None and t <= cap + 1e-6 else None}


def _f(x, fmt="{:.4f}", none="not reached"):
    return none if x is None else fmt.format(x)


def report(d, typ, sf, typ_seq, ablation) -> str:
    info, mode = d["machine"], d["mode"]
    t = d["seconds_to_target"]
    head = d["time_to_auc_speedup"]
    md = ["# Speedup: speedyfeed vs the typical workflow, as time to quality\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads, one process; commit "
          f"{info.get('commit', '?')}. Data: synthetic default, {mode['users']} users. Model: {' '.join(mode['model'])}. "
          f"Learning rates swept for both workflows: {', '.join('x%g' % m for m in d['lr_multiples'])} the defaults. "
          f"Sweep runs: at most {mode['cap']:g} s of training, stopped when dev AUC did not improve for "
          f"{mode['patience']['typical']} / {mode['patience']['speedyfeed']} evaluations, at a constant learning rate. Each "
          f"workflow's best learning rate is then trained for {mode['epochs']['typical']} (typical) / "
          f"{mode['epochs']['speedyfeed']} (speedyfeed) full epochs of the log with the default schedule, a linear decay "
          "over them (the headline's runs). Dev evaluated every "
          f"{mode['every']['typical']:g} s (typical) / {mode['every']['speedyfeed']:g} s (speedyfeed) of training on the "
          "same dev impressions. Times are training-loop seconds (data preparation and evaluation excluded).\n",
          f"\n**Time to the typical workflow's best dev AUC ({d['target_auc']:.4f}): typical {_f(t['typical'], '{:.0f} s')}, "
          f"speedyfeed {_f(t['speedyfeed'], '{:.0f} s')}: {_f(head, '{:.1f}x sooner', 'speedyfeed did not reach it')}.** "
          + f"The typical workflow's best came at {d['best_at_epoch_fraction']['typical']:.0%} of its epoch, "
          f"speedyfeed's at {d['best_at_epoch_fraction']['speedyfeed']:.0%} of its run. "
          "Speedyfeed's time is the first evaluation at or above that AUC. "
          f"Within 0.5 points of it ({d['near_target']['auc']:.4f}): typical {_f(d['near_target']['typical'], '{:.0f} s')}, "
          f"speedyfeed {_f(d['near_target']['speedyfeed'], '{:.0f} s')}: {_f(d['near_target']['speedup'], '{:.1f}x')}.\n",
          "\n## The four figures\n\n",
          md_table(["figure", "what it counts", "typical", "speedyfeed", "speedyfeed / typical"], [
              ["(c) time to quality", "training seconds to the typical workflow's best dev AUC", _f(t["typical"], "{:.0f} s"),
               _f(t["speedyfeed"], "{:.0f} s"), _f(head, "{:.1f}x")],
              ["(a) cost per target", "training targets per second (typical: impression clicks, 4 impression negatives; "
               "speedyfeed: every click of the user sequences, engine.negatives random negatives)",
               f"{rate(typ):.1f}", f"{rate(sf):.1f}", f"{d['per_target_speedup']:.1f}x"],
              ["(a') cost per target, same targets", "typical trained on speedyfeed's targets (train.typical_targets=sequence)",
               f"{rate(typ_seq):.1f}", f"{rate(sf):.1f}", f"{d['per_target_speedup_same_targets']:.1f}x"],
              ["(b) one epoch", "seconds for one epoch of the same log, at the measured rate",
               f"{d['epoch_seconds']['typical']:.0f} s", f"{d['epoch_seconds']['speedyfeed']:.0f} s", f"{d['epoch_speedup']:.1f}x"],
              ["(d) AUC at equal time", f"dev AUC after {d['auc_at_equal_time']['seconds']:.0f} s of training",
               _f(d["auc_at_equal_time"]["typical"], none="n/a"), _f(d["auc_at_equal_time"]["speedyfeed"], none="n/a"), ""],
              ["(d') best AUC", "best dev AUC of the headline runs", f"{d['best_auc']['typical']:.4f}", f"{d['best_auc']['speedyfeed']:.4f}",
               f"{(d['best_auc']['speedyfeed'] - d['best_auc']['typical']) * 100:+.2f} points"]]),
          "\n## The learning-rate sweep\n\n"]
    rows = []
    for name, job in {**d["runs"], **{f"{wf}_epoch": j for wf, j in d["epoch_runs"].items()}}.items():
        s = job["stats"]
        best = max(job["curve"], key=lambda p: p["auc"])
        rows.append([name, f"{s['wall_seconds']:.0f}", f"{s['steps']}", f"{s['clicks_trained']:,.0f}",
                     f"{s['clicks_trained'] / s['clicks_in_data']:.2f}", f"{rate(job):.1f}", f"{s['data_efficiency']:.1%}",
                     f"{best['auc']:.4f} at {best['train_seconds']:.0f} s", _f(seconds_to(job, d["target_auc"]), "{:.0f} s"),
                     _stopped_by(name, s, mode)])
    md.append(md_table(["run", "train s", "steps", "targets", "epochs", "targets/s", "data efficiency", "best dev AUC",
                        "to typical's best", "stopped by"], rows))
    neg_default = str(d["default_negatives"])
    n_def = d["negatives"][neg_default]
    md += [f"\n## Negatives per click (speedyfeed, lr x{d['headline_lr_multiple']:g}, first {mode['negatives_cap']:g} s)\n\n",
           md_table(["engine.negatives", "targets/s", "best dev AUC within the time", "to typical's best within the time"],
                    [[k + (" (default)" if k == neg_default else ""), f"{v['targets_per_second']:.1f}",
                      _f(v["best_auc_within_cap"]), _f(v["seconds_to_target"], "{:.0f} s")]
                     for k, v in sorted(d["negatives"].items())])]
    tb = d.get("token_budgets", {})
    if len(tb) > 1:
        def steps_in(job):  # optimizer steps at the last evaluation within the time
            return max((p["step"] for p in job["curve"] if p["train_seconds"] <= mode["negatives_cap"] + 1e-6), default=0)

        rows = [[f"{tb['default']} (default)", steps_in(sf), f"{n_def['targets_per_second']:.1f}",
                 _f(n_def["best_auc_within_cap"]), _f(n_def["seconds_to_target"], "{:.0f} s")]]
        rows += [[b, steps_in(d["speedyfeed_budgets"][b]), f"{v['targets_per_second']:.1f}", _f(v["best_auc_within_cap"]),
                  _f(v["seconds_to_target"], "{:.0f} s")] for b, v in tb.items() if b != "default"]
        md += [f"\n## Token budget per step (speedyfeed, lr x{d['headline_lr_multiple']:g}, first {mode['negatives_cap']:g} s)\n\n",
               md_table(["engine.token_budget", "steps in the time", "targets/s", "best dev AUC within the time",
                         "to typical's best within the time"], rows)]
    for text, rows in ablation.items():
        base_rate = rate(rows[0][1])
        md += [f"\n## Cumulative ablation, {text} ({mode['ablation_steps']} steps each; typical {mode['typical_ablation_steps']})\n\n",
               md_table(["variant", "targets/s", "vs typical", "data efficiency", "news encoded per target", "cache hit rate"],
                        [[label, f"{rate(j):.1f}", f"{rate(j) / base_rate:.1f}x", f"{j['stats']['data_efficiency']:.1%}",
                          f"{j['stats']['news_encoded'] / max(j['stats']['clicks_trained'], 1):.2f}",
                          f"{j['stats']['cache_hits'] / max(j['stats']['cache_lookups'], 1):.1%}"] for label, j in rows])]
    md.append("\nThe cache serves a row with probability 1 - exp(-beta t) at step t, so in these short runs it is barely "
              "on; its hit rate over whole runs is in the sweep's jobs (`runs` in speedup.json).\n")
    return "".join(md)


if __name__ == "__main__":
    main()
