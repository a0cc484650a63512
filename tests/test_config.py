from pathlib import Path

import pytest
import yaml
from pydantic import Field

from medcl.config import (
    METHOD_CONFIGS,
    Config,
    ConfigError,
    ConfigWarning,
    MethodConfig,
    load_config,
    parse_override,
    register_method_config,
)
from uscl_fixtures import OLD_DEFAULT_SECTIONS, write_frame_sets

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_frame_sets(tmp_path_factory.mktemp("cfg"), n_videos=3)


def load(*overrides: str, preset: str = "uscl") -> Config:
    return load_config(PROJECT / f"configs/{preset}.yaml", list(overrides))


def test_presets_hold_the_paper_defaults(manifest):
    cfg = load(f"data.manifest={manifest}")
    assert cfg.method == "uscl"
    assert (cfg.params.temperature, cfg.params.lambda_sup) == (0.5, 0.2)
    assert (cfg.sampling.alpha, cfg.sampling.beta, cfg.sampling.pairing, cfg.sampling.mixup) == (0.5, 0.5, "video", "paper")
    assert (cfg.data.size, cfg.optim.batch_size, cfg.optim.epochs) == (224, 32, 300)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 3e-4, 1e-4)
    assert cfg.model.proj_dim == 256
    simclr = load(f"data.manifest={manifest}", preset="simclr")
    assert (simclr.method, simclr.sampling.pairing, simclr.sampling.mixup) == ("simclr", "frame", "none")
    assert load(f"data.manifest={manifest}", preset="supervised").method == "supervised"


def test_overrides_are_typed(manifest):
    cfg = load(f"data.manifest={manifest}", "optim.lr=1e-3", "uscl.label_aware=true", "augment.crop_scale=[0.5, 0.9]",
               "sampling.mixup=shared_lambda", "out=runs/a", "optim.max_steps=10")
    assert cfg.optim.lr == 1e-3 and cfg.params.label_aware is True
    assert cfg.augment.crop_scale == (0.5, 0.9) and cfg.sampling.mixup == "shared_lambda"
    assert str(cfg.out) == "runs/a" and cfg.optim.max_steps == 10
    assert parse_override("a.b=2.5e-4") == (["a", "b"], 2.5e-4)
    # round trip through the YAML layout
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "override, message",
    [
        ("uscl.temperature=0", "uscl.temperature=0: Input should be greater than 0"),
        ("uscl.temperature=-1", "uscl.temperature=-1"),
        ("data.label_fraction=0", "data.label_fraction=0"),
        ("data.label_fraction=1.5", "data.label_fraction=1.5"),
        ("data.manifset=x", "data.manifset='x': unknown key"),
        ("uscl.tau=0.5", "uscl.tau=0.5: unknown key"),
        ("optim.name=sgd", "optim.name='sgd'"),
        ("sampling.mixup=cutmix", "sampling.mixup='cutmix'"),
        ("sampling.alpha=0", "sampling.alpha=0"),
        ("augment.crop_scale=[0.9, 0.5]", "augment.crop_scale"),
        ("optim.batch_size=1", "optim.batch_size=1"),
        ("train.device=tpu", "train.device='tpu'"),
        ("optimizer.lr=1", "optimizer={'lr': 1}: unknown key"),
        ("simclr.temperature=0.5", "simclr: section of another method"),
        ("method=byol", "method='byol': unknown method"),
        # non-finite numbers, in any float (or int) field: one rule for every section
        ("optim.lr=.inf", "optim.lr=inf: must be a finite number"),
        ("optim.lr=inf", "optim.lr=inf: must be a finite number"),
        ("optim.lr=.nan", "optim.lr=nan: must be a finite number"),
        ("sampling.alpha=.inf", "sampling.alpha=inf: must be a finite number"),
        ("uscl.lambda_sup=.inf", "uscl.lambda_sup=inf: must be a finite number"),
        ("optim.warmup_epochs=-.inf", "optim.warmup_epochs=-inf: must be a finite number"),
        ("augment.crop_scale=[0.5, .nan]", "augment.crop_scale.1=nan: must be a finite number"),
        ("optim.epochs=.inf", "optim.epochs=inf: must be a finite number"),
    ],
)
def test_invalid_values_name_key_and_value(manifest, override, message):
    with pytest.raises(ConfigError) as info:
        load(f"data.manifest={manifest}", override)
    assert message in str(info.value)


def test_missing_manifest_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"data.manifest='.*nowhere': manifest not found"):
        load(f"data.manifest={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="data.manifest is required"):
        load()


def test_several_problems_reported_together(manifest):
    with pytest.raises(ConfigError) as info:
        load(f"data.manifest={manifest}", "uscl.temperature=0", "optim.lr=-1")
    assert "uscl.temperature=0" in str(info.value) and "optim.lr=-1" in str(info.value)


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["method"])


def test_a_new_method_section_registers_cleanly(manifest):
    class ToyConfig(MethodConfig):
        needs_manifest = False
        weight: float = Field(0.01, gt=0)

    register_method_config("toy", ToyConfig)
    try:
        cfg = load_config(None, ["method=toy", "toy.weight=0.5"])
        assert cfg.params.weight == 0.5 and cfg.to_dict()["toy"] == {"weight": 0.5}
        with pytest.raises(ConfigError, match="toy.weight=0"):
            load_config(None, ["method=toy", "toy.weight=0"])
    finally:
        METHOD_CONFIGS.pop("toy")


def test_each_method_holds_only_its_sections(manifest):
    uscl = load(f"data.manifest={manifest}")
    assert list(uscl.to_dict()) == ["method", "out", "data", "sampling", "augment", "model", "optim", "train", "uscl"]
    assert uscl.unused_sections() == ()
    mixcl = load_config(PROJECT / "configs/mixcl-2d.yaml")
    assert list(mixcl.to_dict()) == ["method", "out", "optim", "train", "mixcl"]
    assert (mixcl.data, mixcl.sampling, mixcl.augment, mixcl.model) == (None, None, None, None)
    assert "sampling" not in mixcl.to_yaml() and "augment" not in mixcl.to_yaml()
    assert Config.from_dict(mixcl.to_dict()).to_dict() == mixcl.to_dict()


@pytest.mark.parametrize("override", ["sampling.alpha=0.3", "augment.enabled=false", "data.size=64", "model.proj_dim=8"])
def test_a_section_the_method_does_not_use_is_refused(override):
    section = override.split(".")[0]
    with pytest.raises(ConfigError) as info:
        load_config(PROJECT / "configs/mixcl-2d.yaml", [override, "optim.lr=-1"])
    message = str(info.value)
    assert f"{section}: not used by method 'mixcl' (its sections: optim, train, mixcl); remove the section" in message
    assert "optim.lr=-1" in message  # reported together with the other problems


def test_unknown_backbone_lists_the_registered_ones(manifest):
    with pytest.raises(ConfigError) as info:
        load(f"data.manifest={manifest}", "model.backbone=resnet50")
    assert "model.backbone='resnet50': unknown backbone; known: resnet18, unetr_encoder" in str(info.value)
    from medcl.models.backbones import BACKBONES, resnet18_backbone

    BACKBONES["resnet18_copy"] = resnet18_backbone
    try:
        assert load(f"data.manifest={manifest}", "model.backbone=resnet18_copy").model.backbone == "resnet18_copy"
    finally:
        BACKBONES.pop("resnet18_copy")


def test_an_old_config_with_default_unused_sections_loads_with_a_warning(tmp_path):
    current = load_config(PROJECT / "configs/mixcl-2d.yaml").to_dict()
    old = {**current, **OLD_DEFAULT_SECTIONS}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.warns(ConfigWarning, match=r"config.yaml: data, sampling, augment, model: not used by method 'mixcl'; "
                                           r"ignored .*remove them"):
        cfg = load_config(tmp_path / "config.yaml")
    assert cfg.to_dict() == current
    # a section that differs from those defaults was written by hand: it is refused, not ignored
    changed = {**old, "sampling": {**OLD_DEFAULT_SECTIONS["sampling"], "alpha": 0.3}}
    with pytest.raises(ConfigError, match="sampling: not used by method 'mixcl'.*configs written by medcl before"):
        Config.from_dict(changed)


def test_a_method_declares_the_shared_sections_it_uses():
    class ModelOnlyConfig(MethodConfig):
        shared_sections = ("model",)
        depth: int = 2

    register_method_config("model_only", ModelOnlyConfig)
    try:
        cfg = load_config(None, ["method=model_only", "model.proj_dim=8"])
        assert cfg.model.proj_dim == 8 and cfg.data is None and cfg.unused_sections() == ("data", "sampling", "augment")
        assert list(cfg.to_dict()) == ["method", "out", "model", "optim", "train", "model_only"]
        with pytest.raises(ConfigError, match="augment: not used by method 'model_only' .its sections: optim, train, model, "
                                              "model_only."):
            load_config(None, ["method=model_only", "augment.flip_p=0"])
    finally:
        METHOD_CONFIGS.pop("model_only")

    class BrokenConfig(MethodConfig):
        needs_manifest = True

    with pytest.raises(TypeError, match="needs_manifest is set but 'data' is not in its shared_sections"):
        register_method_config("broken", BrokenConfig)
    assert "broken" not in METHOD_CONFIGS


# --------------------------------------------------------------------------- non-finite numbers


def _sections() -> list[type]:
    from medcl.config import Section, method_config_class

    for name in METHOD_CONFIGS:
        method_config_class(name)  # imports the lazily registered ones (MixCL)
    found, todo = [], [Section]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_float_field_of_every_section_refuses_inf_and_nan():
    """One rule for all sections, present and future: each float field (alone, in a tuple or list)."""
    import math
    import types
    import typing

    from pydantic import ValidationError

    checked = []
    for cls in _sections():
        for name, field in cls.model_fields.items():
            text = str(field.annotation)
            if "float" not in text:
                continue
            annotation = field.annotation
            if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
                annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
            shape = typing.get_origin(annotation)
            for bad in (math.inf, -math.inf, math.nan):
                value = [bad] * 3 if shape is list else (bad, bad) if shape is tuple else bad
                with pytest.raises(ValidationError) as info:
                    cls.model_validate({name: value})
                assert any(e["type"] == "finite_number" and e["loc"][0] == name for e in info.value.errors()), (cls, name)
            checked.append(f"{cls.__name__}.{name}")
    assert {"OptimConfig.lr", "SamplingConfig.alpha", "AugmentConfig.crop_scale", "USCLConfig.temperature",
            "MixCLConfig.spacing", "MixCLConfig.alpha"} <= set(checked)


def test_free_form_dataset_options_refuse_non_finite_numbers():
    with pytest.raises(ConfigError, match=r"mixcl\.datasets\.0: window=\[inf, 1\]: must be a finite number"):
        load_config(PROJECT / "configs/mixcl-2d.yaml", ["mixcl.datasets=[{adapter: x, root: /tmp, window: [.inf, 1]}]"])


@pytest.mark.parametrize("preset", sorted(p.stem for p in (PROJECT / "configs").glob("*.yaml")))
def test_every_preset_validates(preset, manifest):
    """Each shipped preset passes validation as written (video methods given a manifest)."""
    raw = yaml.safe_load((PROJECT / f"configs/{preset}.yaml").read_text())
    overrides = [] if raw["method"] in ("mixcl", "mixcl_cnn") else [f"data.manifest={manifest}"]  # pool methods: no data
    assert load_config(PROJECT / f"configs/{preset}.yaml", overrides).method == raw["method"]
