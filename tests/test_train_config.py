"""The typed config: YAML + key=value overrides, type checks, close-match errors."""
from pathlib import Path

import pytest
import yaml

from ssl_xcit.train.config import ConfigError, DinoConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_dinos_recipe():
    cfg = load_config()
    assert (cfg.model.out_dim, cfg.dino.student_temp, cfg.dino.teacher_temp) == (65536, 0.1, 0.04)
    assert (cfg.dino.center_momentum, cfg.dino.momentum_teacher) == (0.9, 0.996)
    assert (cfg.optim.lr, cfg.optim.warmup_epochs, cfg.optim.clip_grad) == (5e-4, 10, 3.0)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.freeze_last_layer) == (0.04, 0.4, 1)
    assert cfg.data.local_crops_size == 96 and cfg.data.global_crops_scale == (0.4, 1.0)


def test_yaml_then_overrides_flat_and_dotted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "epochs": 5}, "local_crops_number": 4}))
    cfg = load_config(path, ["lr=2e-3", "optim.epochs=7", "warmup_epochs=0", "global_crops_scale=[0.3, 1]", "norm_last_layer=false"])
    assert cfg.optim.lr == 2e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 7
    assert cfg.data.local_crops_number == 4
    assert cfg.data.global_crops_scale == (0.3, 1.0)
    assert cfg.model.norm_last_layer is False


def test_unknown_key_names_close_matches():
    with pytest.raises(ConfigError, match="teacher_temp"):
        load_config(None, ["teacher_tmp=0.05"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.teacher_temp'"):
        load_config(None, ["optim.teacher_temp=0.05"])


@pytest.mark.parametrize("override, message", [
    ("epochs=abc", "must be an integer"),
    ("lr=-1", "lr must be positive"),
    ("weight_decay=-1", "weight_decay and weight_decay_end must be >= 0"),
    ("weight_decay_end=-0.1", "weight_decay and weight_decay_end must be >= 0"),
    ("precision=fp8", "precision must be"),
    ("global_crops_scale=[0.5]", "list of 2"),
    ("local_crops_scale=[0.6, 0.2]", "0 < min <= max"),
    ("warmup_epochs=200", "warmup_epochs"),
    ("norm_last_layer=maybe", "true or false"),
    ("noequals", "key=value"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder; give a recipe file"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml.*optim.lr"):
        load_config(wrong)


def test_round_trip_through_dict_and_yaml():
    cfg = load_config(None, ["arch=xcit_nano_12_p16", "local_crops_scale=[0.1, 0.3]", "epochs=3", "warmup_epochs=1"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again != DinoConfig()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    from ssl_xcit.finetune.config import FinetuneConfig
    cfg = load_config(path, schema=FinetuneConfig if path.name.startswith("finetune") else DinoConfig)
    assert cfg.model.arch.startswith("xcit")


def test_a_recipe_over_a_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.002, epochs: 7}\nmodel: {arch: xcit_nano_12_p8}\n")
    (tmp_path / "top.yaml").write_text("_base_: base.yaml\noptim: {epochs: 9}\n")
    cfg = load_config(tmp_path / "top.yaml", ["seed=2"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.model.arch, cfg.run.seed) == (0.002, 9, "xcit_nano_12_p8", 2)
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "lost.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="not found: .*nowhere.yaml"):
        load_config(tmp_path / "lost.yaml")


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="xcit_nano_12_p16"):
        load_config(None, ["arch=xcit_nano_12_p61"])


@pytest.mark.parametrize("overrides, numbers", [
    (["arch=xcit_nano_12_p16", "global_crops_size=100"], ("global_crops_size", "100", "16")),
    (["arch=xcit_nano_12_p8", "local_crops_size=36"], ("local_crops_size", "36", "8")),
    (["arch=xcit-nano-12-p16_3rdparty_in1k", "global_crops_size=224", "local_crops_size=40"],
     ("local_crops_size", "40", "16")),
])
def test_crop_sizes_must_divide_by_the_patch_size(overrides, numbers):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for text in numbers:
        assert text in str(err.value), str(err.value)


def test_crop_sizes_that_divide_by_the_patch_are_accepted():
    cfg = load_config(None, ["arch=xcit_nano_12_p8", "global_crops_size=32", "local_crops_size=16"])
    assert (cfg.data.global_crops_size, cfg.data.local_crops_size) == (32, 16)


@pytest.mark.parametrize("override", ["lr=inf", "lr=nan", "min_lr=.inf", "teacher_temp=.nan",
                                      "weight_decay=-inf", "global_crops_scale=[0.4, .inf]",
                                      "clip_grad=inf"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, [override])


def test_non_finite_numbers_in_a_built_config_are_refused():
    from ssl_xcit.train.config import validate
    cfg = DinoConfig()
    cfg.optim.weight_decay_end = float("nan")
    with pytest.raises(ConfigError, match="weight_decay_end.*finite"):
        validate(cfg)


def test_absurd_epochs_are_refused_with_the_bound():
    with pytest.raises(ConfigError, match=r"epochs must be at most [\d,]+.*100000000"):
        load_config(None, ["epochs=1e8"])
