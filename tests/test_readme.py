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
