"""Typed configs: every YAML under configs/ loads and validates; bad input gives one error listing all problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from radalign.pretrain.config import PretrainConfig

from radalign.config import (
    ConfigError,
    available_configs,
    configs_root,
    load_config,
    resolve_config_path,
    to_yaml,
)

ROOT = configs_root()


def _files(sub: str, ext: str) -> list[Path]:
    return sorted((ROOT / sub).glob(f"*.{ext}"))


@pytest.mark.parametrize("path", _files("pretrain", "yaml"), ids=lambda p: p.stem)
def test_every_pretrain_yaml_validates(path):
    cfg = load_config(PretrainConfig, path)
    assert isinstance(cfg, PretrainConfig)
    from radalign.pretrain.models import get_model_config

    assert get_model_config(cfg.model.name)["embed_dim"] > 0  # the model it names exists
    if cfg.deepspeed:
        resolve_config_path(cfg.deepspeed, stage="deepspeed")


@pytest.mark.parametrize("path", _files("deepspeed", "json"), ids=lambda p: p.stem)
def test_deepspeed_json_is_valid(path):
    ds = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] in (1, 2, 3)
    assert ds["gradient_accumulation_steps"] == 1  # accumulation is ours (accum_freq), one source of truth


@pytest.mark.parametrize("path", _files("accelerate", "yaml"), ids=lambda p: p.stem)
def test_accelerate_yaml_points_at_existing_files(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "MULTI_CPU")
    ds_file = cfg.get("deepspeed_config", {}).get("deepspeed_config_file")
    if ds_file:
        assert (ROOT.parent / ds_file).is_file(), ds_file


def test_every_yaml_is_covered_by_a_validating_test():
    """A new YAML folder must come with a validator here (zeroshot prompt sets, ehr and finetune configs are
    validated in their own stage tests: tests/test_zeroshot*.py, tests/test_ehr.py, tests/test_finetune*.py)."""
    covered = {"pretrain", "deepspeed", "accelerate", "zeroshot", "models", "retrieval", "data", "ehr", "finetune"}
    folders = {Path(n).parts[0] for n in available_configs() if len(Path(n).parts) > 1}
    assert folders <= covered, folders - covered


def test_config_by_name_and_by_path_agree():
    by_name = load_config(PretrainConfig, "pretrain/tiny")
    by_short = load_config(PretrainConfig, "tiny", stage="pretrain")
    by_path = load_config(PretrainConfig, ROOT / "pretrain" / "tiny.yaml")
    assert by_name == by_short == by_path


def test_overrides_apply_with_types():
    cfg = load_config(PretrainConfig, "pretrain/tiny", ["steps=7", "optim.lr=0.01", "data.resampled=false",
                                                        "model.pretrained=/tmp/w.safetensors", "optim.warmup_steps=2"])
    assert (cfg.steps, cfg.optim.lr, cfg.data.resampled) == (7, 0.01, False)
    assert cfg.model.pretrained == "/tmp/w.safetensors"


def test_all_problems_reported_at_once_with_fixes():
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, "pretrain/tiny", ["stpes=3", "optim.lrr=1", "data.shardz=x"])
    msg = str(e.value)
    assert "3 problem" in msg
    assert "did you mean 'steps'" in msg
    assert "did you mean 'optim.lr'" in msg
    assert "did you mean 'data.shards'" in msg


def test_type_errors_and_cross_field_rules_are_listed():
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, "pretrain/tiny", ["steps=many", "batch_size=half"])
    assert "steps: 'many' is not a valid int" in str(e.value)
    assert "batch_size" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, "pretrain/tiny",
                    ["precision=fp8", "loss.kind=triplet", "steps=10", "optim.warmup_steps=20",
                     "global_batch_size=100"])
    problems = e.value.problems
    assert len(problems) == 4, problems
    assert any(p.startswith("precision:") and "bf16" in p for p in problems)
    assert any(p.startswith("loss.kind:") for p in problems)
    assert any(p.startswith("optim.warmup_steps:") for p in problems)
    assert any(p.startswith("global_batch_size:") for p in problems)


def test_unknown_keys_and_type_errors_come_in_one_error():
    """Issue 9: unknown keys used to hide type errors until they were fixed."""
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, "pretrain/tiny", ["stpes=3", "batch_size=half", "optim.lrr=1", "nope.x=1"])
    problems = e.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("stpes: unknown key; did you mean 'steps'?")
    assert any(p.startswith("batch_size: 'half' is not a valid int") for p in problems)
    assert any(p.startswith("optim.lrr: unknown key") for p in problems)
    assert any(p.startswith("nope: unknown key") for p in problems)  # its child is not a second problem


def test_bad_override_is_blamed_on_the_command_line_not_the_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 200\nbatch_size: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, path, ["optim.lr=fast", "log_every=5"])
    problems = e.value.problems
    lr = next(p for p in problems if p.startswith("optim.lr:"))
    assert lr.endswith("(command line: optim.lr=fast)"), lr
    batch = next(p for p in problems if p.startswith("batch_size:"))
    assert batch.endswith(f"(in {path})"), batch
    assert len(problems) == 2, problems
    assert "command line" in str(e.value).splitlines()[0] and str(path) in str(e.value).splitlines()[0]


def test_precision_defaults_to_auto_everywhere():
    assert PretrainConfig().precision == "auto"
    for path in _files("pretrain", "yaml"):
        assert load_config(PretrainConfig, path).precision == "auto", path


def test_unknown_config_name_suggests_close_names():
    with pytest.raises(ConfigError, match="pretrain/tiny"):
        load_config(PretrainConfig, "pretrain/tiyn")


def test_malformed_override_is_reported():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(PretrainConfig, "pretrain/tiny", ["steps"])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, "pretrain/tiny", ["steps=111"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(PretrainConfig, path) == cfg


def test_every_field_is_documented():
    from radalign.config import describe

    undocumented = [key for key, _, doc in describe(PretrainConfig) if not doc]
    assert not undocumented


@pytest.mark.parametrize("path", _files("zeroshot", "yaml"), ids=lambda p: p.stem)
def test_every_prompt_set_validates(path):
    from radalign.pretrain.prompts import load_prompt_set

    ps = load_prompt_set(str(path))
    assert ps.class_names


@pytest.mark.parametrize("path", _files("models", "json"), ids=lambda p: p.stem)
def test_every_model_config_validates(path):
    from radalign.pretrain.models import get_model_config, validate_model_config

    assert validate_model_config(get_model_config(str(path))) == []


def test_report_outputs_take_each_files_format_from_its_suffix():
    from radalign.config import output_problems, output_targets

    outs = ["a/x.json", "x.MD", "x.markdown", "y.html", "y.htm"]
    assert output_problems(None, outs) == []
    assert output_targets(None, outs) == [("json", "a/x.json"), ("markdown", "x.MD"), ("markdown", "x.markdown"),
                                          ("html", "y.html"), ("html", "y.htm")]
    assert output_targets("markdown", ["notes.txt"]) == [("markdown", "notes.txt")]  # --format names it
    assert output_targets(None, []) == [("json", None)] and output_targets("html", []) == [("html", None)]
    assert output_problems("markdown", ["notes.txt"]) == []


def test_report_output_problems_name_the_value_and_the_fix():
    from radalign.config import output_problems

    (p,) = output_problems("pdf", ["x.pdf"])
    assert "'pdf'" in p and "json, markdown, html" in p
    (p,) = output_problems("html", ["a.html", "b.md"])
    assert p.startswith("format:") and "2 out files" in p and "drop it" in p
    (p,) = output_problems(None, ["a.html", "notes.txt"])
    assert "'notes.txt'" in p and "--format" in p
    (p,) = output_problems(None, ["a.html", "b.md", "a.html"])
    assert "a.html" in p and "once" in p
