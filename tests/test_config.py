from pathlib import Path

import pytest

from speedyrec.config import STAGES, Config, ConfigError, check_implemented, dump_config, load_config


def test_defaults_hold_the_design_keys():
    cfg = load_config()
    flat = cfg.to_dict()
    for section, keys in {
        "data": ["dir", "format", "strict"],
        "model": ["encoder", "layers", "freeze_layers", "dim"],
        "train": ["workflow", "max_steps", "epochs", "seed", "resume", "checkpoint_every"],
        "engine": ["dedup", "global_dedup", "dynamic_batching", "token_budget", "buckets", "cache", "cache_beta",
                   "cache_gamma", "autoregressive", "negatives", "buslm", "segments", "refine", "refine_topk"],
    }.items():
        for k in keys:
            assert k in flat[section], f"{section}.{k}"
    assert "out_dir" in flat and "stage" in flat
    assert cfg.engine.cache_beta == 2e-3 and cfg.engine.cache_gamma == 20


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("out_dir: runs/x\ntrain:\n  workflow: typical\n  epochs: 3\nengine:\n  segments: [title, body]\n")
    cfg = load_config(str(f), ["train.epochs=5", "engine.cache=false", "engine.cache_beta=0.01"])
    assert cfg.out_dir == "runs/x"
    assert cfg.train.workflow == "typical"
    assert cfg.train.epochs == 5
    assert cfg.engine.cache is False
    assert cfg.engine.cache_beta == 0.01
    assert cfg.engine.segments == ["title", "body"]


def test_list_override_from_the_command_line():
    assert load_config(None, ["engine.segments=title,abstract"]).engine.segments == ["title", "abstract"]


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*'train.epochs'"):
        load_config(None, ["train.epoch=2"])
    with pytest.raises(ConfigError, match=r"'engine.cache_gama'.*'engine.cache_gamma'"):
        load_config(None, ["engine.cache_gama=3"])


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  dims: 64\n")
    with pytest.raises(ConfigError, match=r"'model.dims'.*'model.dim'"):
        load_config(str(f))


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="train.epochs.*integer"):
        load_config(None, ["train.epochs=two"])
    with pytest.raises(ConfigError, match="engine.cache.*true or false"):
        load_config(None, ["engine.cache=maybe"])
    with pytest.raises(ConfigError, match="train.workflow.*typical"):
        load_config(None, ["train.workflow=typcal"])
    with pytest.raises(ConfigError, match="model.dim.*positive"):
        load_config(None, ["model.dim=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


@pytest.mark.parametrize("extra", [["stage=pipeline"], ["stage=distill_finetune"], ["train.workflow=typical"],
                                   ["engine.dedup=false"]])
def test_inbatch_negatives_are_refused_where_they_would_not_apply(extra):
    """Only the finetune stage's speedyfeed click loss scores in-batch negatives, on a deduplicated table; elsewhere
    the key would be silently ignored (or score a copy of a user's own click), so it is refused."""
    load_config(None, ["engine.inbatch_negatives=true"])  # the finetune stage's speedyfeed workflow takes it
    with pytest.raises(ConfigError, match="engine.inbatch_negatives"):
        load_config(None, ["engine.inbatch_negatives=true", *extra])


def test_auto_targets_are_impressions_for_finetuning_and_every_click_for_distillation():
    assert load_config(None, []).engine.targets == "impressions"
    assert load_config(None, ["train.workflow=typical"]).engine.targets == "all"
    for stage in ("finetune_teachers", "distill_finetune", "newsbert", "pipeline", "posttrain"):
        assert load_config(None, [f"stage={stage}"]).engine.targets == "all", stage


@pytest.mark.parametrize("extra", [["train.workflow=typical"], ["stage=posttrain"], ["stage=distill_posttrain"]])
def test_impression_targets_are_refused_where_no_click_loss_takes_them(extra):
    for stage in ("finetune", "finetune_teachers", "distill_finetune", "newsbert", "pipeline"):
        assert load_config(None, [f"stage={stage}", "engine.targets=impressions"]).engine.targets == "impressions"
    with pytest.raises(ConfigError, match="engine.targets"):
        load_config(None, ["engine.targets=impressions", *extra])
    with pytest.raises(ConfigError, match="engine.targets"):
        load_config(None, ["engine.targets=impression"])


@pytest.mark.parametrize("extra", [["engine.cache=false"], ["engine.cache_gamma=0"], ["train.workflow=typical"]])
def test_deferred_cache_gradients_need_the_cache(extra):
    load_config(None, ["engine.cache_deferred_grad=true"])
    with pytest.raises(ConfigError, match="engine.cache_deferred_grad"):
        load_config(None, ["engine.cache_deferred_grad=true", *extra])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/c.yaml")


def test_every_stage_is_accepted_and_unbuilt_keys_are_rejected():
    for stage in STAGES:
        check_implemented(load_config(None, [f"stage={stage}"]), {})
    cfg = load_config(None, ["engine.refine=true"])
    with pytest.raises(ConfigError, match="engine.refine.*not implemented yet"):
        check_implemented(cfg, {"engine.refine": False})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "engine.segments=title,body"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert isinstance(again, Config)


def test_numbers_in_any_form_a_person_types(tmp_path):
    cfg = load_config(None, ["train.lr=4e-4", "train.encoder_lr=1E-3", "engine.token_budget=2_000",
                             "data.synthetic_users=1e3", "train.max_seconds=90"])
    assert cfg.train.lr == 4e-4 and cfg.train.encoder_lr == 1e-3
    assert cfg.engine.token_budget == 2000 and cfg.data.synthetic_users == 1000
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 4e-4\n  warmup_steps: 1_000\n")  # YAML 1.1 reads 4e-4 as a string
    cfg = load_config(str(f))
    assert cfg.train.lr == 4e-4 and cfg.train.warmup_steps == 1000
    with pytest.raises(ConfigError, match="train.lr.*number.*'fast'"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.lr.*number"):
        load_config(None, ["train.lr=nan"])
    with pytest.raises(ConfigError, match="engine.token_budget.*integer.*2.5"):
        load_config(None, ["engine.token_budget=2.5"])


def test_every_shipped_config_loads_and_validates():
    """speedyrec/configs/*.yaml: each loads (unknown keys and bad values are errors) and names its stage."""

    folder = Path(__file__).resolve().parent.parent / "speedyrec" / "configs"
    files = sorted(folder.glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"main", "mind_small_1gpu", "mind_small_8gpu", "mind_large_1gpu", "mind_large_8gpu", "tiny_newsrec",
            "newsbert"} <= names
    for f in files:
        same = load_config(str(f)).to_dict() == load_config().to_dict()
        assert same if f.stem == "main" else not same, f  # main.yaml spells out the defaults; the others change some


@pytest.mark.parametrize("stage, schedule, negatives", [
    ("finetune", "linear", 4), ("pipeline", "constant", 1), ("finetune_teachers", "constant", 1),
    ("distill_finetune", "constant", 1), ("newsbert", "constant", 1), ("posttrain", "constant", 1)])
def test_auto_defaults_are_resolved_per_stage_and_saved_resolved(tmp_path, stage, schedule, negatives):
    """train.lr_schedule=auto and engine.negatives=0 (auto), the defaults: linear decay and 4 negatives per click
    for stage=finetune (chosen by benchmarks.tune), constant and 1 where the distillation stages' results were
    measured with them; the config a run saves names what it used."""
    cfg = load_config(overrides=[f"stage={stage}"])
    assert (cfg.train.lr_schedule, cfg.engine.negatives) == (schedule, negatives)
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert (again.train.lr_schedule, again.engine.negatives) == (schedule, negatives)
    assert load_config(overrides=[f"stage={stage}", "engine.negatives=2"]).engine.negatives == 2
    assert load_config(overrides=[f"stage={stage}", "train.lr_schedule=constant"]).train.lr_schedule == "constant"


@pytest.mark.parametrize("overrides, lrs", [
    ([], (4e-4, 2e-4)), (["train.workflow=typical"], (1e-4, 5e-5)), (["stage=distill_finetune"], (1e-4, 5e-5)),
    (["stage=pipeline"], (1e-4, 5e-5)), (["train.lr=0", "train.encoder_lr=3e-5"], (0.0, 3e-5))])
def test_auto_learning_rates_are_four_times_the_base_for_speedyfeed_finetuning(overrides, lrs):
    """train.lr and train.encoder_lr = -1 (auto): 4x the base rates where benchmarks.speedup chose them, the base
    rates elsewhere; 0 means zero, not auto; a negative rate other than -1 is an error naming the key."""
    cfg = load_config(overrides=overrides)
    assert (cfg.train.lr, cfg.train.encoder_lr) == pytest.approx(lrs)
    with pytest.raises(ConfigError, match="train.encoder_lr"):
        load_config(overrides=["train.encoder_lr=-0.5"])


def test_compile_is_refused_outside_finetuning():
    assert load_config(overrides=["train.compile=true"]).train.compile
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(overrides=["train.compile=true", "stage=posttrain"])


def test_buslm_default_segments_keep_the_fields_with_a_budget_and_an_explicit_list_must_have_them():
    from speedyrec.build import segments_of

    cfg = load_config(None, ["engine.buslm=true"])  # data.abstract_tokens=0, data.body_tokens=0
    assert segments_of(cfg) == ["title"]
    cfg = load_config(None, ["engine.buslm=true", "data.body_tokens=64"])
    assert segments_of(cfg) == ["title", "body"]
    with pytest.raises(ConfigError, match="engine.segments lists abstract but data.abstract_tokens is 0"):
        load_config(None, ["engine.buslm=true", "engine.segments=[title,abstract]"])
    with pytest.raises(ConfigError, match="no text field is used"):
        load_config(None, ["engine.buslm=true", "data.title_tokens=0"])
    with pytest.raises(ConfigError, match="posttrain.body_field"):
        load_config(None, ["posttrain.body_field=lead"])
