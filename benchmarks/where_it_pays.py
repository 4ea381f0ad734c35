"""Where the engine pays: speedyfeed against the typical workflow across the shape of the data.

``python -m benchmarks.where_it_pays [--quick] [--users N] [--out DIR] [--kept-only]``

A grid over how many clicks a user has (synthetic histories of mean length 10, 25, 50 and 100:
``data.synthetic_history_mean``) and how long a news is (titles: ``data.title_tokens=30``; titles and abstracts:
also ``data.abstract_tokens=64``), with the speedup benchmark's model, one process, the precision ``train.amp=auto``
resolves:

- at every point, from short runs of each workflow (``--steps``): per target (speedyfeed's targets/s over the
  typical workflow's) and per epoch (the seconds of one epoch of the same log at those rates). Both train the
  impressions' clicks (speedyfeed's defaults, ``engine.targets=auto``). The typical workflow pads every history to
  ``data.max_history`` = 50 clicks and encodes it again for every impression click, so its cost per target does
  not move with the history; speedyfeed encodes a user's history once per batch, each news once, as context for
  all of the user's impression clicks, so a longer history makes its targets dearer;
- at the shortest and the longest history, titles only: time to quality as the speedup benchmark measures it (each
  workflow at the learning rate its sweep chose, from speedup.json; the typical workflow trained until its dev AUC
  plateaus; both timed to its best running mean of 3 evaluations; one seed).

Which point is like what: the real MIND slice has histories of mean 32 and titles with abstracts (between 25 and
50, titles + abstract); the SpeedyFeed paper's production log had 15.3 clicks per user on average, long-tailed and
cut at 100, with news of up to 96 tokens, and its typical workflow padded histories to 100 with a 12-layer
encoder, which multiplies the typical workflow's cost per target (the 128.7x of the paper).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import committed_runs, machine, md_table, run_job_kept, write_results
from benchmarks.speedup import (FULL, HEADLINE_ARM, QUICK, SMOOTH, best_smoothed, chosen_multiples, lr_overrides, rate,
                               smoothed, smoothed_seconds_to)

HISTORIES = (10, 25, 50, 100)
TEXTS = {"titles": ["data.title_tokens=30"], "titles + abstract": ["data.title_tokens=30", "data.abstract_tokens=64"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.where_it_pays", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users, few steps")
    p.add_argument("--users", type=int, default=0, help="synthetic users (default: the speedup benchmark's)")
    p.add_argument("--steps", type=int, default=0, help="speedyfeed steps per rate run (default 12; quick 3); the "
                   "typical workflow runs a quarter of them (its steps are long)")
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--kept-only", action="store_true", help="run nothing: tabulate the runs kept in --out or committed")
    p.add_argument("--fresh", action="store_true", help="run again what the committed results hold")
    a = p.parse_args(argv)
    mode = dict(QUICK if a.quick else FULL)
    users = a.users or mode["users"]
    steps = a.steps or (3 if a.quick else 12)
    typ_steps = max(steps // 4, 2)
    # the learning rates the speedup benchmark's sweep chose: time to quality waits for that sweep
    mult = chosen_multiples(a.quick)
    if mult is None:
        print("the speedup benchmark's learning-rate sweep has not run: time to quality is left out", flush=True)
    info = machine()
    committed = {} if a.quick else committed_runs("where_it_pays", a.fresh)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)

        def kept(name, overrides):
            job = run_job_kept(name, overrides, root, may_run=not a.kept_only, committed=committed.get(name),
                               timeout=6 * 3600, ledger="" if a.quick else "where_it_pays")
            if job is not None:
                runs[name] = job
            return job

        def base(history: int, text: str, wf: str) -> list[str]:
            return [f"data.synthetic_users={users}", f"data.synthetic_history_mean={history}", *TEXTS[text],
                    *mode["model"], *mode["eval"], f"train.workflow={wf}"]

        # rates at the default learning rates (a step costs the same at any rate), so the grid needs no sweep first
        for history in HISTORIES:
            for text in TEXTS:
                for wf in ("typical", "speedyfeed"):
                    n = typ_steps if wf == "typical" else steps
                    kept(f"rate_h{history}_{_slug(text)}_{wf}", base(history, text, wf) +
                         [f"train.max_steps={n}", "eval.max_impressions=1"])
        for history in (HISTORIES[0], HISTORIES[-1]) if mult else ():
            for wf in ("typical", "speedyfeed"):
                plan = wf if wf == "typical" else HEADLINE_ARM  # the speedup benchmark's plan for the defaults
                kept(f"quality_h{history}_{wf}", base(history, "titles", wf) +
                     [*lr_overrides(mult[wf]), f"train.epochs={mode['epochs'][plan]}",
                      f"eval.every_seconds={mode['every'][plan]:g}", f"eval.patience={mode['patience'][plan]}"])
    payload = summarize(runs, mult, users, steps, typ_steps)
    payload.update(machine=info, quick=a.quick, runs=runs)
    md = report(payload)
    write_results("where_it_pays_quick" if a.quick else "where_it_pays", payload, md, lambda path: plot(path, payload))
    print(md)
    return payload


def _slug(text: str) -> str:
    return text.replace(" + ", "_").replace(" ", "_")


def summarize(runs: dict, mult: dict, users: int, steps: int, typ_steps: int) -> dict:
    points = []
    for history in HISTORIES:
        for text in TEXTS:
            typ, sf = (runs.get(f"rate_h{history}_{_slug(text)}_{wf}") for wf in ("typical", "speedyfeed"))
            if typ is None or sf is None:
                continue
            st, ss = typ["stats"], sf["stats"]
            epoch = {"typical": st["clicks_in_data"] / rate(typ), "speedyfeed": ss["clicks_in_data"] / rate(sf)}
            points.append({
                "history_mean": history, "text": text,
                # the targets of an epoch per user (the impressions' clicks, for both workflows by default)
                "targets_per_user": ss["clicks_in_data"] / users,
                "impression_clicks": st["clicks_in_data"], "speedyfeed_targets": ss["clicks_in_data"],
                "tokens_per_news": ss["valid_tokens"] / max(ss["news_encoded"], 1),
                "targets_per_second": {"typical": rate(typ), "speedyfeed": rate(sf)},
                "per_target_speedup": rate(sf) / rate(typ),
                "epoch_seconds": epoch, "epoch_speedup": epoch["typical"] / epoch["speedyfeed"]})
    quality = {}
    for history in (HISTORIES[0], HISTORIES[-1]):
        typ, sf = runs.get(f"quality_h{history}_typical"), runs.get(f"quality_h{history}_speedyfeed")
        if typ is None or sf is None:
            continue
        target = best_smoothed(typ)
        t_typ, t_sf = smoothed_seconds_to(typ, target), smoothed_seconds_to(sf, target)
        quality[str(history)] = {"target_auc": target, "seconds_to_target": {"typical": t_typ, "speedyfeed": t_sf},
                                 "time_to_auc_speedup": t_typ / t_sf if t_sf else None,
                                 "best_smoothed": {"typical": target, "speedyfeed": best_smoothed(sf)}}
    return {"points": points, "time_to_quality": quality, "lr_multiple": mult, "users": users, "steps": steps,
            "typical_steps": typ_steps, "smooth": SMOOTH}


def _f(x, fmt="{:.1f}x", none="not reached"):
    return none if x is None else fmt.format(x)


def report(d: dict) -> str:
    m = d["machine"]
    old_form = any("clicks_per_user" in p for p in d["points"])  # measured when speedyfeed trained every click
    per_user = "clicks_per_user" if old_form else "targets_per_user"
    rows = [[p["history_mean"], f"{p[per_user]:.1f}", p["text"],
             f"{p['tokens_per_news']:.1f}", f"{p['targets_per_second']['typical']:.1f}",
             f"{p['targets_per_second']['speedyfeed']:.1f}", f"{p['per_target_speedup']:.1f}x",
             f"{p['epoch_seconds']['typical']:.0f} / {p['epoch_seconds']['speedyfeed']:.0f}",
             f"{p['epoch_speedup']:.1f}x"] for p in d["points"]]
    q = [[h, f"{v['target_auc']:.4f}", _f(v["seconds_to_target"]["typical"], "{:.0f} s"),
          _f(v["seconds_to_target"]["speedyfeed"], "{:.0f} s"), _f(v["time_to_auc_speedup"]),
          _f(v["best_smoothed"]["speedyfeed"], "{:.4f}")] for h, v in d["time_to_quality"].items()]
    return "\n".join([
        "# Where the engine pays: speedyfeed against the typical workflow across the shape of the data\n",
        f"Device: {m['device']}, torch {m['torch']}; commit {m.get('commit', '?')}. Synthetic data, {d['users']:,} users, "
        f"histories of the given mean length; the speedup benchmark's model ("
        + (f"time to quality at its sweep's learning rates, x{d['lr_multiple']['typical']:g} typical / "
           f"x{d['lr_multiple']['speedyfeed']:g} speedyfeed" if d["lr_multiple"] else
           "time to quality waits for its learning-rate sweep") + "). Rates from "
        f"{d['typical_steps']} (typical) / {d['steps']} (speedyfeed) optimizer steps; an epoch is "
        + ("each workflow's own targets of the same log (typical: the impressions' clicks; speedyfeed, measured "
           "before its default became impression targets: every click of the user sequences)" if old_form else
           "the impressions' clicks of the same log (speedyfeed's defaults)") + ", at those rates.\n",
        md_table(["history mean (asked)", "clicks per user (generated)" if old_form else
                  "targets per user (impression clicks)", "text", "real tokens per news",
                  "typical targets/s", "speedyfeed targets/s", "per target", "epoch s (typical / speedyfeed)",
                  "per epoch"], rows),
        f"\nTime to quality, titles, one seed: the typical workflow trained until its dev AUC plateaus, both timed "
        f"to its best running mean of {d['smooth']} evaluations.\n",
        md_table(["history mean", "target", "typical reaches it", "speedyfeed reaches it", "speedup",
                  "speedyfeed's best running mean"], q),
        "\nThe real MIND slice (histories of mean 32, titles and abstracts) lies between the rows of 25 and 50 with "
        "abstracts; the SpeedyFeed paper's production log (15.3 clicks per user, long-tailed, up to 96 tokens per "
        "news) is nearest the rows of 10 to 25 with abstracts in its data, but its typical workflow padded histories "
        "to 100 clicks of a 12-layer encoder, where ours pads to 50 on 2 layers.\n"])


def plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for text, marker in zip(TEXTS, ("o", "s")):
        pts = [p for p in d["points"] if p["text"] == text]
        h = [p["history_mean"] for p in pts]
        ax[0].plot(h, [p["per_target_speedup"] for p in pts], marker=marker, label=f"per target, {text}")
        ax[0].plot(h, [p["epoch_speedup"] for p in pts], marker=marker, ls="--", label=f"per epoch, {text}")
    ax[0].set_xscale("log")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("mean history length (clicks)")
    ax[0].set_ylabel("speedyfeed / typical")
    ax[0].legend(fontsize=7)
    for h in d["time_to_quality"]:
        run_t, run_s = d["runs"].get(f"quality_h{h}_typical"), d["runs"].get(f"quality_h{h}_speedyfeed")
        for job, ls, wf in ((run_t, ":", "typical"), (run_s, "-", "speedyfeed")):
            if job is not None:
                sm = smoothed(job)
                ax[1].plot([max(t, 1.0) for t, _ in sm], [a for _, a in sm], ls=ls, label=f"{wf}, history {h}")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("training seconds (log)")
    ax[1].set_ylabel(f"dev AUC, running mean of {SMOOTH}")
    if ax[1].lines:
        ax[1].legend(fontsize=7)
    else:
        ax[1].text(0.5, 0.5, "time to quality: not run yet", ha="center", va="center", transform=ax[1].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
