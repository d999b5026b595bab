"""Typed configs: YAML + dotted overrides; bad keys and types fail with the key's path."""
from __future__ import annotations

from pathlib import Path

import pytest

from avar_ray.config import ConfigError, RunConfig, load_config, reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig), path


def test_dotted_overrides_and_types(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny_local.yaml",
                      ["rl.lr=1e-6", "rl.placement.learners=2", "intervention.layers=[0, 2]", "ray.address=null"])
    assert cfg.rl.lr == 1e-6 and isinstance(cfg.rl.lr, float)
    assert cfg.rl.placement.learners == 2
    assert cfg.intervention.layers == [0, 2]
    assert cfg.ray.address is None
    # an int where a float is expected widens; defaults fill what the file leaves out
    cfg = load_config(None, ["sft.lr=1"])
    assert cfg.sft.lr == 1.0 and cfg.sft.alpha == 0.15


@pytest.mark.parametrize("override,message", [
    ("rl.lrr=1e-6", r"rl\.lrr: unknown key"),
    ("rl.placement.gpus=1", r"rl\.placement\.gpus: unknown key"),
    ("rl.lr=fast", r"rl\.lr: expected float, got 'fast'"),
    ("sft.num_workers=2.5", r"sft\.num_workers: expected int"),
    ("sft.freeze_vision=yes please", r"sft\.freeze_vision: expected bool"),
    ("rl.reward.visual_norm=softmax", r"rl\.reward\.visual_norm: expected one of 'none', 'squash', 'group_z'"),
    ("intervention.layers=[0, x]", r"intervention\.layers\[1\]: expected int"),
    ("rl.placement=3", r"rl\.placement: expected a mapping"),
    ("intervention.a_sys=1.0", r"intervention\.a_sys: must be in \[0, 1\)"),
    ("rl.n_samples=1", r"rl\.n_samples"),
    ("rl.lr", r"expected key\.path=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sft:\n  zero_stage: 2\n  optimiser: adam\n")
    with pytest.raises(ConfigError, match=r"sft\.optimiser: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("key,new_key", [
    ("sft.bf16", "model.dtype"), ("sft.agto_layers", "attention.layers"), ("rl.tensorboard", "tracking.backends"),
    ("rl.reward.visual_layers", "attention.layers"), ("rl.reward.eps", "attention.eps"),
])
def test_removed_keys_name_their_replacement(tmp_path, key, new_key):
    *sections, name = key.split(".")
    path = tmp_path / "old.yaml"
    path.write_text("".join(f"{'  ' * i}{section}:\n" for i, section in enumerate(sections))
                    + f"{'  ' * len(sections)}{name}: null\n")
    with pytest.raises(ConfigError, match=rf"{key}: removed; use {new_key}"):
        load_config(path)


def test_config_reference_doc_is_current():
    doc = REPO / "docs" / "config_reference.md"
    assert doc.exists(), "run `make config-doc`"
    assert doc.read_text().strip() == reference_markdown().strip(), "docs/config_reference.md is stale: run `make config-doc`"
