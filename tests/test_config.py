"""Configs: YAML + dotted overrides onto dataclasses; bad keys and types name the key."""

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from common.config import ConfigError, load_config, parse_config, require, save_config
from tests.conftest import ROOT


@dataclass
class Frames:
    num: int = 8
    strategy: Literal["uniform", "fps", "all"] = "uniform"
    fps: float | None = None


@dataclass
class StageConfig:
    model: str = "outputs/tiny/model"
    lr: float = 1e-4
    bf16: bool = False
    tags: list[str] = field(default_factory=list)
    frames: Frames = field(default_factory=Frames)

    def validate(self) -> None:
        require(self.frames.num > 0, "frames.num", f"must be > 0, got {self.frames.num}")


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_then_overrides_take_precedence_with_parsed_types(tmp_path):
    path = write(tmp_path, {"lr": 0.001, "frames": {"num": 4}})
    cfg = load_config(StageConfig, path, ["frames.num=16", "bf16=true", "tags=[a, b]", "frames.fps=2"])
    assert cfg.lr == 0.001
    assert cfg.frames.num == 16 and cfg.frames.strategy == "uniform"
    assert cfg.bf16 is True and cfg.tags == ["a", "b"]
    assert cfg.frames.fps == 2.0 and isinstance(cfg.frames.fps, float)


def test_int_given_for_float_is_accepted_and_null_for_optional():
    cfg = load_config(StageConfig, None, ["lr=1", "frames.fps=null"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.frames.fps is None


def test_exponent_without_dot_is_a_float_in_files_and_overrides(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a researcher means a number.
    assert load_config(StageConfig, write(tmp_path, {"lr": "2e-6"})).lr == 2e-6
    assert load_config(StageConfig, None, ["lr=1e-3"]).lr == 1e-3


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, {"frames": {"nmu": 4}})
    with pytest.raises(ConfigError, match=r"unknown key 'frames\.nmu'.*cfg\.yaml"):
        load_config(StageConfig, path)


def test_unknown_override_names_key_and_command_line():
    with pytest.raises(ConfigError, match=r"unknown key 'frame\.num' \(command line\)"):
        load_config(StageConfig, None, ["frame.num=3"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("frames.num=abc", r"frames\.num: expected an integer"),
        ("frames.num=1.5", r"frames\.num: expected an integer"),
        ("lr=fast", r"lr: expected a number"),
        ("bf16=3", r"bf16: expected true/false"),
        ("frames.strategy=random", r"frames\.strategy: 'random' is not one of"),
        ("frames=3", r"frames: expected a mapping"),
        ("tags=x", r"tags: expected a list"),
        ("lr", r"not key=value"),
    ],
)
def test_wrong_type_names_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(StageConfig, None, [override])


def test_validate_hook_runs_after_overrides():
    with pytest.raises(ConfigError, match=r"frames\.num: must be > 0, got 0"):
        load_config(StageConfig, None, ["frames.num=0"])


def test_missing_config_file_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(StageConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(StageConfig, bad)


def test_saved_config_reloads_to_the_same_values(tmp_path):
    cfg = load_config(StageConfig, None, ["frames.num=12", "tags=[x]"])
    saved = save_config(cfg, tmp_path / "out")
    assert load_config(StageConfig, saved) == cfg


def test_parse_config_exits_nonzero_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(StageConfig, ["--config", "does/not/exist.yaml"])
    assert e.value.code == 2
    assert "does/not/exist.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["eval.py", "train_ktr.py", "label_frames.py", "train_voyager.py"])
def test_every_stage_rejects_an_unknown_key_before_any_work(stage):
    proc = subprocess.run([sys.executable, str(ROOT / stage), "no_such_key=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unknown key 'no_such_key'" in proc.stderr


STAGE_OF = {"sft": "train_sft", "ktr": "train_ktr", "grpo": "train_ktr", "eval": "eval", "label": "label_frames",
            "voyager": "train_voyager"}


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")
                                        if "accelerate" not in p.parts), ids=str)
def test_every_shipped_config_loads_into_its_stage(path):
    import importlib

    stage = next(v for k, v in STAGE_OF.items() if path.stem.startswith(k))
    module = importlib.import_module(stage)
    load_config(module.Config, ROOT / path, validate=False)


def test_grpo_configs_are_the_ktr_configs_with_every_signal_off():
    import train_ktr

    for folder in ("configs", "configs/tiny"):
        ktr = load_config(train_ktr.Config, ROOT / folder / "ktr.yaml", validate=False)
        grpo = load_config(train_ktr.Config, ROOT / folder / "grpo.yaml", validate=False)
        assert grpo.signal_ratios == {} and ktr.signal_ratios
        for name in ("visual", "temporal", "entropy"):
            setattr(grpo.attribution, name, getattr(ktr.attribution, name))
        grpo.output_dir = ktr.output_dir
        assert grpo == ktr
