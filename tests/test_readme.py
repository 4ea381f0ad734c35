"""The README's benchmark section is generated from benchmarks/results/: a hand-edited figure, or a result
committed without regenerating the README, fails here."""
import json

from benchmarks import readme


def test_readme_benchmark_section_is_what_the_results_say():
    assert readme.main(["--check"]) == 0, "run: python -m benchmarks.readme"


def test_the_readme_is_short_and_its_links_lead_somewhere():
    """The README is what a newcomer reads in five minutes (<= 200 lines); the detail lives in the files it links,
    which exist, and its table gives each benchmark with results a figure and its details page."""
    import re

    text = readme.README.read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert {"docs/configuration.md", "docs/operations.md", "benchmarks/README.md"} <= set(links)
    for link in links:
        if not link.startswith("http"):
            assert (readme.README.parent / link).is_file(), link
    table = text.split(readme.TABLE_BEGIN)[1].split(readme.TABLE_END)[0]
    assert "| `speedup` |" in table and "sooner" in table and "| `main_job` |" in table


def test_a_missing_or_quick_result_is_left_out(tmp_path):
    (tmp_path / "token_store.json").write_text(json.dumps(
        {"machine": {"device": "cpu", "torch": "x"}, "news": 10, "tokens": 100, "build_seconds": 1.0,
         "load_seconds": 0.5, "assemble_4096_news_ms": 2.0}))
    (tmp_path / "speedup.json").write_text(json.dumps({"quick": True}))
    text = readme.render(tmp_path)
    assert "10 news (100 tokens) are tokenized once in 1.0 s" in text
    assert "Cost per training target" not in text and "Multi-teacher" not in text


def test_durations_come_from_the_results_and_the_last_quick_run(tmp_path, monkeypatch):
    """A benchmark's duration is what write_results recorded (machine.seconds), else its kept training jobs'
    process seconds (each job once); --quick durations from benchmarks.run's record; the rest say so."""
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "_REUSED", [])  # another test's run_job_kept may have reused a job
    info = common.machine()
    info["started"] -= 90.0  # as if the benchmark had run for 90 s
    common.write_results("limit", {"machine": info}, "")
    assert 90.0 <= json.loads((tmp_path / "limit.json").read_text())["machine"]["seconds"] < 120.0
    job = {"command": "x", "process_seconds": 600.0}
    (tmp_path / "tune.json").write_text(json.dumps({"machine": {}, "runs": {"a": job, "again": job}}))
    (tmp_path / "run_durations.json").write_text(json.dumps(
        {"quick": {"machine": {"commit": "abc"}, "seconds": {"tune": 30.0, "limit": 12.0}, "total_seconds": 42.0}}))
    text = "".join(readme.durations(tmp_path))
    assert "| limit | 2 min | 0.2 min |" in text  # 90 s, rounded
    assert "| tune | 10 min (its training jobs) | 0.5 min |" in text  # one job, counted once
    assert "| cache | not run | not run |" in text
    assert "0.7 min in all, commit abc" in text


def test_a_benchmark_that_reused_kept_jobs_records_no_duration_of_its_own(tmp_path, monkeypatch):
    """Re-deriving a table from kept runs takes seconds: that is not the benchmark's duration. write_results
    records it apart (invocation_seconds, reused_jobs) and the README falls back to the kept jobs' seconds; a
    payload rewritten after each run keeps its duration current; a machine read back from a file is left alone."""
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "_REUSED", [])
    info = common.machine()
    info["started"] -= 60.0
    payload = {"machine": info, "runs": {"a": {"command": "x", "process_seconds": 1200.0}}}
    common.write_results("cache", payload, "")
    first = json.loads((tmp_path / "cache.json").read_text())["machine"]["seconds"]
    info["started"] -= 60.0  # a second run finished: the rewritten result counts it
    common.write_results("cache", payload, "")
    assert json.loads((tmp_path / "cache.json").read_text())["machine"]["seconds"] >= first + 60.0
    common.note_reused("a")
    common.write_results("cache", payload, "")
    saved = json.loads((tmp_path / "cache.json").read_text())["machine"]
    assert "seconds" not in saved and saved["reused_jobs"] == 1 and saved["invocation_seconds"] >= 120.0
    assert "| cache | 20 min (its training jobs) |" in "".join(readme.durations(tmp_path))
    loaded = {"machine": {**saved, "started": 0.0, "seconds": 5.0}}  # e.g. --report re-rendering a file
    common.write_results("cache", loaded, "")
    assert json.loads((tmp_path / "cache.json").read_text())["machine"]["seconds"] == 5.0


def test_the_tune_verdict_is_written_from_the_sweep(monkeypatch):
    """Which value ends above the defaults by more than their spread, and which reach the target sooner but end
    lower, follow the rows; a value that is today's default is said to be one."""
    import benchmarks.tune as tune

    monkeypatch.setattr(tune, "report", lambda d: "title\n\nbody")
    monkeypatch.setattr(tune, "defaults", lambda: {"train.warmup_steps": 20, "engine.negatives": 4})
    row = lambda last, to: {"last_mean_auc": last, "last_std_auc": 0.002, "seconds_to_target": to}  # noqa: E731
    d = {"summary": {"defaults": row(0.750, 500.0), "train.warmup_steps=20": row(0.753, 600.0),
                     "engine.negatives=1": row(0.741, 400.0), "engine.random_negatives=popularity": row(0.751, None),
                     "train.lr_schedule=constant": row(0.740, None)}}
    text = readme.tune(d)[0]
    assert ("(0.20 points), in this one seed: `train.warmup_steps=20` (the default since; the target at 600 s, "
            "the defaults at 500 s).") in text  # popularity is +0.1, within the spread
    assert "but ending lower: `engine.negatives=1` (at 400 s, -0.90 points)." in text  # constant never reaches it
    d["summary"] = {"defaults": row(0.750, None), "engine.negatives=1": row(0.749, 400.0)}
    text = readme.tune(d)[0]
    assert "so the defaults stand" in text and "`engine.negatives=1` (at 400 s, -0.10 points)" in text


def test_the_readmes_main_job_time_was_measured_with_todays_defaults():
    """The README states how long the main job takes, from benchmarks/results/main_job.json; that timing belongs to
    the defaults it ran with. A changed default (a new default negatives count, say) makes the stated time a
    promise nobody checked: time the job again."""
    from speedyrec.config import NOT_READ_BY_THE_MAIN_JOB, defaults_digest, flat_config, load_config

    d = json.loads((readme.RESULTS / "main_job.json").read_text())
    assert not d["quick"]
    if defaults_digest(d["defaults"]) != defaults_digest():
        now, then = flat_config(load_config(None, []).to_dict()), d.get("defaults", {})
        changed = sorted(k for k in set(now) | set(then) if now.get(k, "(none)") != then.get(k, "(none)")
                         and not k.startswith(NOT_READ_BY_THE_MAIN_JOB))
        raise AssertionError(f"the defaults changed since the main job was timed ({', '.join(changed) or 'see the hash'}"
                             "): run python -m benchmarks.main_job, then python -m benchmarks.readme")
    assert d["seconds"] <= d["limit_seconds"], "the main job takes longer than the README promises"
    # the hash reads only what the main job reads: a default of another stage changes nothing it runs, any of its own
    changed = dict(d["defaults"], **{"distill.stage1_projections": not d["defaults"].get("distill.stage1_projections")})
    assert defaults_digest(changed) == defaults_digest(d["defaults"])
    for key in ("engine.negatives", "train.lr", "model.layers"):
        assert defaults_digest({**d["defaults"], key: -1}) != defaults_digest(d["defaults"]), key
    # a key added since counts only away from the value that does what the timed run did
    from speedyrec.config import AS_BEFORE, NOT_READ_BY_THE_MAIN_JOB

    for key, before in AS_BEFORE.items():
        assert defaults_digest({**d["defaults"], key: before}) == defaults_digest({k: v for k, v in d["defaults"].items()
                                                                                   if k != key})
        if not key.startswith(NOT_READ_BY_THE_MAIN_JOB):  # (an added key of another stage matters to its benchmarks)
            assert defaults_digest({**d["defaults"], key: f"not {before}"}) != defaults_digest(d["defaults"]), key


def test_the_tiny_newsrec_verdicts_are_each_results_files_own_words(tmp_path):
    """The README's distillation section shows each of the paper's other experiments as its results file words
    it (the lines the README picks), with how many of the 3 seeds it holds: fewer are said to be provisional."""
    verdict = ["- `no_stage1`: AUC -0.40 points against `full` over 1 seed(s), below the full student.",
               "- Figure 3: Stage II matters more than Stage I: agrees."]
    (tmp_path / "ablation.json").write_text(json.dumps({"seeds": ["0"], "verdict": verdict}))
    (tmp_path / "student_gap.json").write_text(json.dumps({"seeds": [0, 1, 2], "verdict": [
        "- The gap: +0.70.", "- all layers trained: +0.10.", "- Answer: none of the three."]}))
    (tmp_path / "kd_methods.json").write_text(json.dumps({"quick": True, "seeds": [0], "verdict": ["x"]}))
    text = readme.tiny_newsrec_verdicts(tmp_path)
    assert ("- **Figures 3-4, each stage and each loss removed** (`benchmarks.ablation`, 1 of 3 seeds; provisional, "
            "[ablation.md](benchmarks/results/ablation.md)): Figure 3: Stage II matters more than Stage I: agrees.") in text
    assert "no_stage1" not in text  # the row-by-row lines stay in the md
    assert ("(`benchmarks.student_gap`, 3 of 3 seeds, [student_gap.md](benchmarks/results/student_gap.md)): "
            "The gap: +0.70. Answer: none of the three.") in text
    assert "- **Table 4, other multi-teacher methods** (`benchmarks.kd_methods`): not measured yet." in text
    assert text.count("not measured yet") == 3  # a quick result is not the README's


def test_a_tiny_newsrec_table_with_a_row_not_run_or_short_of_seeds_is_provisional(tmp_path):
    """Three seeds of every ablation row but body_512 is not a finished table: the README names the row not run; and
    a row recorded for fewer seeds than the others sets the count (kd_methods' rows are recorded seed by seed)."""
    from benchmarks import ablation

    rows = {r: {"seeds": {s: {"auc": 0.7} for s in "012"}} for r in ablation.ROWS if r != "body_512"}
    (tmp_path / "ablation.json").write_text(json.dumps({"seeds": ["0", "1", "2"], "rows": rows,
                                                       "verdict": ["- Figure 3: agrees."]}))
    kd = {"ensemble": {"0": {}, "1": {}, "2": {}}, "tinybert_mt": {"0": {}, "1": {}, "2": {}},
          "newsbert_mt": {"0": {}}, "mt_bert": {"0": {}, "1": {}, "2": {}}, "tiny_newsrec": {"0": {}, "1": {}, "2": {}}}
    (tmp_path / "kd_methods.json").write_text(json.dumps({"seeds": [0, 1, 2], "rows": kd, "verdict": ["- a.", "- b."]}))
    text = readme.tiny_newsrec_verdicts(tmp_path)
    assert "(`benchmarks.ablation`, 3 of 3 seeds; not run yet: `body_512`; provisional, [ablation.md]" in text
    assert "(`benchmarks.kd_methods`, 1 of 3 seeds; provisional, [kd_methods.md]" in text
    rows["body_512"] = {"seeds": {s: {"auc": 0.7} for s in "012"}}
    (tmp_path / "ablation.json").write_text(json.dumps({"seeds": ["0", "1", "2"], "rows": rows,
                                                       "verdict": ["- Figure 3: agrees."]}))
    assert "(`benchmarks.ablation`, 3 of 3 seeds, [ablation.md]" in readme.tiny_newsrec_verdicts(tmp_path)


def test_the_whole_tiny_newsrec_sets_cost_counts_each_run_once(tmp_path):
    """A seed's base run kept by several results files is one run; each file's own runs are its share; a quick result
    is not the set's; past 12 hours the line says by how much."""
    run = lambda s: {"command": "python -m speedyrec.train", "process_seconds": s}  # noqa: E731
    (tmp_path / "ablation.json").write_text(json.dumps({"runs": {"base_seed_0": run(3600.0), "no_emb_0": run(1800.0)}}))
    (tmp_path / "student_gap.json").write_text(json.dumps({"runs": {"base_seed_0": run(3600.0), "gap_0": run(900.0)}}))
    (tmp_path / "kd_methods.json").write_text(json.dumps({"quick": True, "runs": {"seed_0_mt_bert": run(9e5)}}))
    cost = readme.tiny_set_cost(tmp_path)
    assert cost == {"runs": 3, "seconds": 6300.0, "own_seconds": {"ablation": 1800.0, "student_gap": 900.0},
                    "shared_seconds": 3600.0}
    line = readme.tiny_newsrec_verdicts(tmp_path).splitlines()[-1]
    assert line.endswith("3 runs, 1.8 hours on 2 cores (shared by several experiments 1.0, `ablation` 0.5, "
                         "`student_gap` 0.2): within a night (12 h).")
    (tmp_path / "efficiency.json").write_text(json.dumps({"runs": {"eff_l4_seed_0": run(12 * 3600.0)}}))
    assert readme.tiny_newsrec_verdicts(tmp_path).rstrip().endswith("more than a night (12 h) by 1.8 h.")
