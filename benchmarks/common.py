"""Shared pieces of the benchmarks: run a training job in a fresh process, collect what it wrote, write results."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_LIVE: list[dict] = []  # the machine() dicts of this process: write_results times only those
_REUSED: list[str] = []  # kept training jobs this process reused instead of running (see write_results)

# every benchmark, in the order benchmarks.run runs them (where_it_pays reads the learning rates speedup chose, tune
# its typical workflow's best AUC) and the README's durations table lists them
BENCHMARK_ORDER = ("main_job", "token_store", "data_efficiency", "precision", "speedup", "where_it_pays", "tune",
                   "cache", "buslm", "scaling", "limit", "context", "multiteacher", "pipeline", "quality", "scale",
                   "ablation", "kd_methods", "teacher_count", "efficiency", "student_gap")
# Tiny-NewsRec's experiments beyond Table 3 share each seed's base run (benchmarks.quality.seed_base_run) through
# one --out: benchmarks.run gives them one
SHARED_OUT = ("ablation", "kd_methods", "teacher_count", "efficiency", "student_gap")

def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        info["load_average_before"] = os.getloadavg()
    except OSError:
        pass
    info["commit"] = source_commit()
    info["started"] = time.time()  # write_results turns it into the benchmark's duration (machine.seconds)
    _LIVE.append(info)
    return info


def note_reused(name: str) -> None:
    """Record that a kept job stood in for running ``name``: this invocation's wall time is then not the
    benchmark's duration (write_results records it apart, and the README counts the kept jobs instead)."""
    _REUSED.append(name)


def note_not_run(name: str) -> None:
    """Say that ``name`` has no kept run and --kept-only forbids running it: its row is left out of the tables."""
    print(f"{name}: not run yet (--kept-only): left out of the tables", flush=True)


def source_commit() -> str:
    """The commit the benchmarks run from: git's, or, in a ``git archive`` snapshot (a tree without .git, as
    used to time one commit while the checkout changes), the one git wrote into benchmarks/COMMIT."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if not commit:
        stamped = (here / "COMMIT").read_text().strip() if (here / "COMMIT").exists() else ""
        commit = "" if stamped.startswith("$Format") else stamped
    return commit


def run_job(name: str, overrides: list[str], out_root: Path, nproc: int = 1, timeout: int = 3600,
            stage: str = "", env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``speedyrec.train`` with the overrides in a fresh process (``env``, ``cwd``: its environment and folder,
    e.g. a PYTHONPATH and a folder outside the checkout, to run another commit's code); return its stats,
    metrics, timing and the targets/s of its logged windows (read from ``out_dir/<stage>/`` for a distillation
    stage)."""
    out_dir = out_root / name
    cmd = [sys.executable, "-m", "speedyrec.train", f"out_dir={out_dir}", "train.log_every=0", *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "speedyrec.train", *cmd[3:]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results = out_dir / stage if stage else out_dir
    stats = json.loads((results / "stats.json").read_text()) if (results / "stats.json").exists() else {}
    metrics = json.loads((results / "metrics.json").read_text())
    job = {"name": name, "command": " ".join(cmd[1:]), "stats": stats, "metrics": metrics, "process_seconds": elapsed,
           "commit": source_commit()}  # tables are completed across sessions: each run says what code it ran
    if (out_dir / "config.yaml").exists():  # and the settings it ran (a later session checks them: changed_defaults)
        import yaml

        job["config"] = yaml.safe_load((out_dir / "config.yaml").read_text())
    if (results / "dev_curve.json").exists():
        job["curve"] = json.loads((results / "dev_curve.json").read_text())["points"]
    if (results / "log.jsonl").exists():
        lines = [r for r in map(json.loads, (results / "log.jsonl").read_text().splitlines()) if r.get("kind") == "train"]
        job["log_rates"] = [r["targets_per_second"] for r in lines if "targets_per_second" in r]
        job["log_tokens_per_second"] = [r["tokens_per_second"] for r in lines if "tokens_per_second" in r]
    return job


def committed_runs(name: str, fresh: bool = False) -> dict:
    """The training jobs in benchmarks/results/NAME.json (its "runs") and in its ledger of finished runs
    (results/ledger/NAME.json, see ``ledger_add``), for ``run_job_kept(committed=...)``: a table measured across
    sessions continues in a checkout whose run folders are gone. Empty when ``fresh`` or when nothing is
    committed."""
    if fresh:
        return {}
    path = RESULTS / f"{name}.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    return {**runs, **ledger_runs(name)}


def ledger_path(name: str) -> Path:
    return RESULTS / "ledger" / f"{name}.json"


def ledger_runs(name: str) -> dict:
    """The runs of benchmark ``name`` finished so far (its ledger), by run name."""
    path = ledger_path(name)
    return json.loads(path.read_text())["runs"] if path.exists() else {}


def ledger_add(name: str, run: str, job: dict) -> None:
    """Record a finished run of benchmark ``name`` in its ledger, at once: a benchmark longer than one session
    (the speedup headline, the where-it-pays sweep) commits its ledger and the next session continues from it.
    Every job says the commit it ran (``job["commit"]``), so a table completed across sessions shows its code."""
    runs = ledger_runs(name)
    if runs.get(run) == job:
        return
    runs[run] = job
    path = ledger_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": name, "runs": runs}, indent=1) + "\n")
    tmp.replace(path)


def ledger_clear(name: str) -> None:
    """The benchmark finished and its results file holds its runs: the ledger is no longer needed."""
    ledger_path(name).unlink(missing_ok=True)


def run_job_kept(name: str, overrides: list[str], out_root: Path, may_run: bool = True, committed: dict | None = None,
                 check_defaults: bool = True, ledger: str = "", before_run=None, **kw) -> dict | None:
    """``run_job``, kept as ``out_root/NAME/job.json``: a later call with the same overrides reuses it, so an
    interrupted benchmark given the same ``--out`` continues where it stopped. ``committed``: the job as a
    results file holds it (a table measured across sessions, whose run folders are gone), reused when nothing is
    kept and it ran the same overrides. ``may_run`` false: None for a job neither kept nor committed (a benchmark
    re-derived from the runs made so far). ``check_defaults`` false: a run of other code (another commit), whose
    defaults are its own. ``ledger``: the benchmark whose ledger records the job (run or kept; see ledger_add).
    ``before_run()``: called just before the job runs (not when it is reused), e.g. to make what it reads.
    A file ``out_root/STOP`` stops the benchmark before its next new run (the one running finishes first)."""
    kept = out_root / name / "job.json"
    if kept.exists():
        job = json.loads(kept.read_text())
        if job.get("overrides") != overrides:
            raise SystemExit(f"{kept} was run with other settings ({job.get('overrides')}); use another --out")
        if check_defaults and (changed := changed_defaults(out_root / name, overrides)):
            raise SystemExit(f"{kept} was run with the same overrides but other defaults ({', '.join(changed)}); "
                             "use another --out")
        print(f"{name}: reusing {kept}", flush=True)
        note_reused(name)
        if ledger:
            ledger_add(ledger, name, job)
        return job
    # a committed job is this run when it ran these overrides, or (its config recorded) other overrides that
    # resolve to the same settings: a default that changed since is named in the overrides to keep a run's meaning
    same = committed is not None and (committed.get("overrides") == overrides or (
        check_defaults and "config" in committed and not _runtime_keys_differ(committed.get("overrides", []), overrides)))
    if same:
        changed = check_defaults and "config" in committed and changed_defaults(out_root / name, overrides,
                                                                                 committed["config"])
        if not changed:
            print(f"{name}: reusing the committed run", flush=True)
            note_reused(name)
            if ledger:
                ledger_add(ledger, name, committed)
            return committed
        print(f"{name}: the committed run had other defaults ({', '.join(changed)}): not reused", flush=True)
    if not may_run:
        note_not_run(name)
        return None
    if (out_root / "STOP").exists():  # a session ending: stop between runs, the finished ones are in the ledger
        raise SystemExit(f"{out_root / 'STOP'} exists: stopped before {name}; remove it and run again to continue")
    if before_run is not None:
        before_run()
    print(f"{name}: running {' '.join(overrides)}", flush=True)
    job = {**run_job(name, overrides, out_root, **kw), "overrides": overrides}
    kept.write_text(json.dumps(job, indent=2) + "\n")
    if ledger:
        ledger_add(ledger, name, job)
    return job


def relocated(recorded: dict | None, overrides: list[str]) -> dict | None:
    """``recorded`` as ``run_job_kept`` compares it with ``overrides``: the folder it read (``distill.from_dir``, e.g.
    a seed's base run or MT-BERT's teachers) lay in the ``--out`` of the session that ran it; the folder of the same
    name in this ``--out`` (the same seed's job of the same settings) stands for it."""
    key = "distill.from_dir="
    here = next((o[len(key):] for o in overrides if o.startswith(key)), None)
    if recorded is None or here is None:
        return recorded

    def moved(path):
        return here if Path(str(path)).name == Path(here).name else path

    out = {**recorded, "overrides": [key + moved(o[len(key):]) if o.startswith(key) else o
                                     for o in recorded.get("overrides", [])]}
    if "config" in recorded:
        distill = recorded["config"].get("distill", {})
        out["config"] = {**recorded["config"], "distill": {**distill, "from_dir": moved(distill.get("from_dir", ""))}}
    return out


def run_job_relocated(name: str, overrides: list[str], out_root: Path, recorded: dict | None, **kw) -> dict | None:
    """``run_job_kept`` of a job that reads another job's folder (``distill.from_dir``), with ``recorded`` its record
    from a results file (made in another ``--out``: compared ``relocated``); the record as it ran when reused."""
    compared = relocated(recorded, overrides)
    job = run_job_kept(name, overrides, out_root, committed=compared, **kw)
    return recorded if job is compared else job


def _runtime_keys_differ(a: list[str], b: list[str]) -> bool:
    """Whether two override lists set a key resolved at run time (RUNTIME_RESOLVED: train.amp=auto, ...)
    differently: a recorded config holds what such a key resolved to, which cannot tell "auto" from the value."""
    from speedyrec.config import RUNTIME_RESOLVED

    def runtime(overrides):
        return {o for o in overrides if o.split("=", 1)[0] in RUNTIME_RESOLVED}

    return runtime(a) != runtime(b)


def changed_defaults(run_dir: Path, overrides: list[str], saved_config: dict | None = None) -> list[str]:
    """Keys whose value the overrides give today differs from what the kept run saved in its config.yaml (or
    ``saved_config``, the config a committed job recorded; its out_dir is not compared): a
    default changed since (or a key was added), so the kept run no longer measures these overrides. A key added
    since whose value is off (false, 0, empty) is no difference: the kept run ran without it, as this one would. A
    key added since at its AS_BEFORE value (what runs without it did) is no difference either. A
    key the run resolves when it starts (RUNTIME_RESOLVED, e.g. train.amp=auto on the machine) is compared only when
    set explicitly. A stage=finetune run ignores the sections that stage never reads (NOT_READ_BY_THE_MAIN_JOB:
    the distillation stages' options), as the main job's timing does."""
    import yaml

    saved = run_dir / "config.yaml"
    if saved_config is None:
        if not saved.exists():
            return []
        saved_config = yaml.safe_load(saved.read_text())
    else:
        saved_config = {**saved_config, "out_dir": str(run_dir)}

    from speedyrec.config import AS_BEFORE, NOT_READ_BY_THE_MAIN_JOB, RUNTIME_RESOLVED, flat_config, load_config
    from speedyrec.recipes.resume import differing_keys

    # in the order run_job passes them: the overrides win
    want = flat_config(load_config(overrides=[f"out_dir={run_dir}", "train.log_every=0", *overrides]).to_dict())
    unread = NOT_READ_BY_THE_MAIN_JOB if want["stage"] == "finetune" else ()

    def matters(k, then, now):
        added_as_before = then is None and (not now or AS_BEFORE.get(k, object()) == now)
        return (k in want and not added_as_before and RUNTIME_RESOLVED.get(k, object()) != now
                and not k.startswith(unread))

    return [f"{k}: {then!r} -> {now!r}"
            for k, then, now in differing_keys(saved_config, want, matters)]


def write_results(name: str, payload: dict, markdown: str, plot=None) -> None:
    """benchmarks/results/NAME.{json,md[,png]}; ``plot(path)`` draws the figure when given. A ledger of NAME whose
    runs the payload's ``runs`` all hold is no longer needed and goes. A payload whose
    ``machine`` came from ``machine()`` in this process records how long the benchmark ran so far, in
    ``machine.seconds`` (rewritten at every call), unless the process reused kept jobs: then its wall time
    misses their time, and it is recorded as ``machine.invocation_seconds`` beside ``machine.reused_jobs``. A
    ``machine`` read back from a results file keeps what it says."""
    info = payload.get("machine")
    if any(info is live for live in _LIVE):
        took = round(time.time() - info["started"], 1)
        if _REUSED:
            info.pop("seconds", None)
            info.update(invocation_seconds=took, reused_jobs=len(_REUSED))
        else:
            info["seconds"] = took
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    if "runs" in payload and set(ledger_runs(name)) <= set(payload["runs"]):  # the results file holds them all
        ledger_clear(name)
    (RESULTS / f"{name}.md").write_text(markdown)
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            plot(RESULTS / f"{name}.png")
            import matplotlib.pyplot as plt

            plt.close("all")  # a benchmark rewritten after every run would otherwise keep every figure open
        except ImportError:
            print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)


def clear_of_spread(mean: float, std: float, n: int) -> bool:
    """The benchmarks' word "clear" for a difference over seeds: its mean is beyond twice its spread (standard
    deviation) over n > 1 seeds; with 3 seeds that is about a one-sided p of 0.04, one spread about 0.1."""
    return n > 1 and abs(mean) > 2 * std


def clear_mark(mean: float, std: float, n: int) -> str:
    """The mark that tells a firm verdict (``clear_of_spread``) from one that only exceeds its spread once."""
    return " (clear: beyond twice its spread)" if clear_of_spread(mean, std, n) else ""


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"
