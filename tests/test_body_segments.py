"""posttrain.body_segments: post-training and Stage I read a body as S BusLM segments of posttrain.body_tokens. One
segment is today's one sequence; S segments see S x body_tokens of the body and no more; the frozen-prefix cache
serves segments as it computes them; a teacher bank is keyed by the body layout; a tiny pipeline runs end to end;
the settings that cannot work are refused."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_distill_e2e import args, check_click_metrics, read

from speedyrec.config import ConfigError, load_config
from speedyrec.data.token_store import TokenStore, build_or_load_field
from speedyrec.distill.bank import TeacherBank
from speedyrec.distill.snapshots import read_snapshot
from speedyrec.distill.title_body import body_encoder_of, body_reader, build_title_body_data
from speedyrec.engine.distributed import DistInfo
from speedyrec.models.backbone import BertFamilyBackbone, random_bert, train_wordpiece_tokenizer
from speedyrec.models.frozen_prefix import FrozenCachePlace
from speedyrec.models.recommender import NewsEncoder
from speedyrec.models.shared_prefix import SharedPrefixStack
from speedyrec.train import main

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
         "xray", "yankee", "zulu"]
BODY_TOKENS = 8  # a segment: [CLS], 6 words, [SEP]


def _texts(n: int = 12, words: int = 40) -> dict:
    """Titles and bodies of one word per token; body 1 is body 0 with word 20 changed (in the 4th segment of 6
    words), body 2 is body 0 with word 30 changed (beyond 4 segments)."""
    rng = np.random.default_rng(0)
    bodies = [[WORDS[i] for i in rng.integers(0, len(WORDS) - 1, words)] for _ in range(n)]
    bodies[1], bodies[2] = list(bodies[0]), list(bodies[0])
    bodies[1][20], bodies[2][30] = "zulu", "zulu"  # zulu is in no other body
    titles = [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 4)) for _ in range(n)]
    return {"title": titles, "body": [" ".join(b) for b in bodies]}


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("segments")
    texts = _texts()
    tok = train_wordpiece_tokenizer(texts["title"] + texts["body"], 200, tmp / "tok.json")
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in WORDS)  # a word is a token
    return tmp, texts, tok


def _data(tiny_text, segments: int):
    """build_title_body_data on the tiny texts (a context with what it reads)."""
    tmp, texts, tok = tiny_text
    cfg = load_config(None, [f"posttrain.body_tokens={BODY_TOKENS}", f"posttrain.body_segments={segments}",
                             "posttrain.body_field=body", "posttrain.holdout=0", "posttrain.negatives=2",
                             "posttrain.batch_size=4"])

    def field_store(field, max_tokens):
        ft = build_or_load_field(tmp / "cache", field, texts[field], tok, max_tokens)[0]
        return TokenStore({field: ft}, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)

    ctx = SimpleNamespace(cfg=cfg, dist=DistInfo(), field_store=field_store)
    return build_title_body_data(ctx)


def _model(vocab: int, segments: int, freeze_layers: int = 0):
    torch.manual_seed(0)
    hf = random_bert(dict(hidden=32, layers=2, heads=4, intermediate=64), vocab_size=vocab, pad_id=0, dropout=0.0)
    enc = NewsEncoder(BertFamilyBackbone(hf, freeze_layers=freeze_layers), dim=16, attention_dim=8).eval()
    body = body_encoder_of(enc, segments)
    return SimpleNamespace(news_encoder=enc, **({"body_encoder": body} if body is not enc else {}))


def _bodies(data, model, news) -> torch.Tensor:
    with torch.no_grad():
        return data.bodies.encode(body_reader(model), data.bodies.prepare(np.asarray(news)))[0]


def test_one_segment_is_the_one_sequence_of_today(tiny_text, tmp_path):
    """body_segments=1 reads the same tokens as 0, through BusLM with one segment, which equals the plain encoder
    (as test_buslm shows for the click stages); with a frozen layer, whose output the cache serves the second time."""
    vocab = len(tiny_text[2])
    today, one = _data(tiny_text, 0), _data(tiny_text, 1)
    assert today.bodies.segments is None and one.bodies.segments == ["body"]
    news = np.arange(12)
    tokens = one.bodies.prepare(news)
    assert tokens.mask.shape == (12, 1, BODY_TOKENS)
    assert torch.equal(tokens.input_ids[:, 0], today.bodies.prepare(news).input_ids)
    plain, bus = _model(vocab, 0, freeze_layers=1), _model(vocab, 1, freeze_layers=1)
    assert bus.body_encoder.backbone is bus.news_encoder.backbone and bus.body_encoder.proj is bus.news_encoder.proj
    want = _bodies(today, plain, news)
    torch.testing.assert_close(_bodies(one, bus, news), want, atol=1e-5, rtol=1e-5)
    one.bodies.enable_frozen_prefix(32, FrozenCachePlace(tmp_path, torch.float32, True, False), "body")
    first = _bodies(one, bus, news)  # computed and stored
    again = _bodies(one, bus, news[::-1])  # served from the cache
    assert one.bodies.frozen.computed == 12 and one.bodies.frozen.hits == 12
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.flip(0), want, atol=1e-5, rtol=1e-5)
    one.bodies.close_frozen_prefix()


def test_segments_read_s_times_body_tokens_of_the_body_and_no_more(tiny_text):
    tmp, texts, tok = tiny_text
    four = _data(tiny_text, 4)
    assert four.bodies.segments == ["body"] * 4
    tokens = four.bodies.prepare(np.arange(3))
    assert tokens.mask.shape == (3, 4, BODY_TOKENS) and tokens.mask.all()  # 40 words: all four segments full
    # the segments' words are the body's first 4 x 6, in order
    content = tokens.input_ids[0, :, 1:-1].reshape(-1)
    full = tok(texts["body"][0], add_special_tokens=False)["input_ids"]
    assert content.tolist() == full[:24]
    model = _model(len(tok), 4)
    v = _bodies(four, model, [0, 1, 2])
    assert not torch.allclose(v[0], v[1], atol=1e-4)  # word 20 is in the 4th segment: the encoder sees it
    torch.testing.assert_close(v[0], v[2], atol=0, rtol=0)  # word 30 is beyond the 4 segments
    one_sequence = _bodies(_data(tiny_text, 0), _model(len(tok), 0), [0, 1])
    torch.testing.assert_close(one_sequence[0], one_sequence[1], atol=0, rtol=0)  # 6 words: neither seen


def test_a_teacher_bank_is_keyed_by_the_body_layout(tiny_text, tmp_path):
    """The same teacher (same checksum given) reading bodies as one sequence, as one segment, or as four: three
    banks, none read for another."""
    vocab = len(tiny_text[2])
    news = np.arange(12)
    dirs = []
    for segments in (0, 1, 4):
        model = _model(vocab, segments)
        stack = SharedPrefixStack([getattr(model, "body_encoder", model.news_encoder)])
        bank, build = TeacherBank.open_or_build(stack, ["0" * 64], _data(tiny_text, segments).bodies, news, tmp_path,
                                                DistInfo())
        assert build.news_encoded == 12 and build.padded_tokens == 0  # built anew; equal lengths need no padding
        dirs.append(bank.directories[0])
    assert len(set(dirs)) == 3


def test_a_tiny_pipeline_reads_bodies_in_segments(tmp_path, cache_dir, synthetic_small, capsys):
    out = tmp_path / "segments"
    assert main(args(out, cache_dir, synthetic_small, "stage=pipeline", "posttrain.body_segments=2")) == 0
    summary = read(out / "metrics.json")
    assert set(summary["models"]) == {"teacher_1", "teacher_2", "ensemble", "student"}
    for m in summary["models"].values():
        check_click_metrics(m)
    snap = read_snapshot(out / "posttrain/snapshots/teacher_1.safetensors")
    assert snap["meta"]["body_segments"] == 2 and any(k.startswith("segment_pool.") for k in snap["delta"])
    student = read_snapshot(out / "distill_posttrain/student.safetensors")
    assert student["meta"]["body_segments"] == 2 and any(k.startswith("segment_pool.") for k in student["delta"])
    s1 = read(out / "distill_posttrain/stats.json")
    assert s1["teachers"] == 2 and s1["bank_padded_tokens"] == 0 and s1["loss_distill"] > 0
    assert s1["bank_news_encoded"] == 2 * 2 * 750  # titles and bodies of every news, 2 teachers
    assert all(0 <= t["retrieval_acc"] <= 1 for t in read(out / "distill_posttrain/metrics.json")["teachers"].values())
    stage1 = ("stage=distill_posttrain", f"distill.from_dir={out}")
    # the same teachers and body settings: both banks are read, nothing encoded
    again = tmp_path / "again"
    assert main(args(again, cache_dir, synthetic_small, *stage1, "posttrain.body_segments=2")) == 0
    assert read(again / "distill_posttrain/stats.json")["bank_news_encoded"] == 0
    # other body tokens: the title bank is read, the body bank is built anew
    shorter = tmp_path / "shorter"
    assert main(args(shorter, cache_dir, synthetic_small, *stage1, "posttrain.body_segments=2",
                     "posttrain.body_tokens=16")) == 0
    assert read(shorter / "distill_posttrain/stats.json")["bank_news_encoded"] == 2 * 750
    # teachers post-trained in 2 segments do not teach a student that reads bodies otherwise
    capsys.readouterr()
    for other in (0, 4):
        assert main(args(tmp_path / f"s{other}", cache_dir, synthetic_small, *stage1,
                         f"posttrain.body_segments={other}")) == 2
        assert f"post-trained on bodies read with posttrain.body_segments=2; this run reads them with " \
               f"posttrain.body_segments={other}" in capsys.readouterr().err


def test_posttraining_in_one_segment_trains_as_one_sequence(tmp_path, cache_dir, synthetic_small):
    """The whole recipe (optimizer, frozen-prefix cache, snapshots, retrieval) with body_segments=1 against 0: the
    same snapshots, the one-segment ones holding a segment pooling besides (which one segment leaves untouched)."""
    runs = {}
    for s in (0, 1):
        out = tmp_path / f"s{s}"
        assert main(args(out, cache_dir, synthetic_small, "stage=posttrain", f"posttrain.body_segments={s}")) == 0
        runs[s] = read(out / "posttrain/metrics.json"), read_snapshot(out / "posttrain/snapshots/teacher_2.safetensors")
    (m0, s0), (m1, s1) = runs[0], runs[1]
    assert set(s1["delta"]) - set(s0["delta"]) == {k for k in s1["delta"] if k.startswith("segment_pool.")} != set()
    for name, t in s0["delta"].items():
        torch.testing.assert_close(s1["delta"][name], t, atol=1e-4, rtol=1e-3, msg=name)
    for a, b in zip(m0["snapshots"], m1["snapshots"]):
        assert a["retrieval_acc"] == pytest.approx(b["retrieval_acc"], abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def config(*over: str):
    return load_config(None, ["model.encoder=random:hidden=32,layers=4,heads=2,intermediate=64", *over])


@pytest.mark.parametrize("over, needle", [
    (("posttrain.body_segments=-1",), "'posttrain.body_segments' must be >= 0"),
    (("posttrain.body_segments=2", "distill.intermediate_weight=1"),
     "a body read as BusLM segments (posttrain.body_segments=2) has no such teacher layers"),
    (("stage=posttrain", "engine.buslm=true", "posttrain.body_segments=2"),
     "engine.buslm sets how the click stages read a news")])
def test_settings_that_cannot_work_are_refused(over, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        config(*over)


def test_runs_before_the_key_read_one_sequence():
    from speedyrec.config import AS_BEFORE

    assert AS_BEFORE["posttrain.body_segments"] == 0 == config().posttrain.body_segments
