"""The README's benchmark section is generated from benchmarks/results/: a hand-edited figure, or a result
committed without regenerating the README, fails here."""
import json

from benchmarks import readme


def test_readme_benchmark_section_is_what_the_results_say():
    assert readme.main(["--check"]) == 0, "run: python -m benchmarks.readme"


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
