"""Guards users hit, checked without Ray: ``config.validate`` rules (each bad value is refused
naming its key, and the edge of each allowed range still loads), ``device=cuda`` without CUDA,
RL / SFT / eval needing a system span on a chat template without one (Qwen3-VL), and SFT pointed at an earlier run's output folder with ``sft.resume=false`` (refused before any
Ray or model is started; RL's side and the complete outputs: tests/test_auto_resume.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avar_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides,message", [
    (["rl.temperature=0"], r"rl\.temperature: must be positive"),
    (["rl.temperature=-1"], r"rl\.temperature: must be positive"),
    (["rl.max_staleness=-1"], r"rl\.max_staleness: must be >= 0"),
    (["rl.tis_cap=0"], r"rl\.tis_cap: must be positive"),
    (["rl.prompts_per_step=1", "rl.n_samples=2", "rl.placement.learners=2", "rl.mini_batches=2"],
     r"rl\.prompts_per_step \* rl\.n_samples: must be >= rl\.placement\.learners \* rl\.mini_batches"),
    (["rl.gpu_memory_utilization=0"], r"rl\.gpu_memory_utilization: must be in \(0, 1\]"),
    (["rl.gpu_memory_utilization=1.2"], r"rl\.gpu_memory_utilization: must be in \(0, 1\]"),
    (["eval.gpu_memory_utilization=-0.5"], r"eval\.gpu_memory_utilization: must be in \(0, 1\]"),
    (["rl.placement.learner_cpus=-1"], r"rl\.placement\.learner_cpus: must be >= 0"),
    (["rl.placement.rollout_gpus=-0.5", "eval.stats_cpus=-1"], r"rl\.placement\.rollout_gpus, eval\.stats_cpus: must be >= 0"),
    (["synth.caption.num_gpus=-1"], r"synth\.caption\.num_gpus: must be >= 0"),
    (["sft.cpus_per_worker=-2"], r"sft\.cpus_per_worker: must be >= 0"),
    (["serve.num_cpus=-1"], r"serve\.num_cpus: must be >= 0"),
    (["ray.num_cpus=-4"], r"ray\.num_cpus: must be >= 0"),
])
def test_validate_refuses_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_validate_accepts_the_edges_of_each_range():
    cfg = load_config(None, ["rl.temperature=0.01", "rl.max_staleness=0", "rl.tis_cap=null", "rl.gpu_memory_utilization=1",
                             "eval.gpu_memory_utilization=0.01", "rl.placement.learner_cpus=0", "rl.placement.reward_cpus=0",
                             "rl.prompts_per_step=1", "rl.n_samples=4", "rl.placement.learners=2", "rl.mini_batches=2",
                             "ray.num_cpus=null"])
    assert cfg.rl.gpu_memory_utilization == 1 and cfg.rl.tis_cap is None and cfg.rl.placement.learner_cpus == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for machines without CUDA")
def test_device_cuda_without_cuda_is_refused_naming_the_settings():
    from avar_ray.modeling import resolve_device

    with pytest.raises(ValueError, match=r"eval\.device or serve\.device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_sft_on_an_earlier_runs_folder_is_refused_with_resume_off(tmp_path):
    from avar_ray.sft import run_sft

    out = tmp_path / "sft"
    (out / "checkpoints" / "step_4").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_4")  # what DeepSpeed leaves
    cfg = load_config(REPO / "configs" / "tiny_local.yaml",
                      [f"sft.out={out}", f"sft.data={tmp_path / 'missing'}", f"model.path={tmp_path}",
                       "sft.resume=false"])
    with pytest.raises(ValueError, match=r"sft\.out: .* holds checkpoints of an earlier run \(step 4\)"):
        run_sft(cfg)


def test_vars_on_a_template_without_a_system_turn_is_refused_at_start(tiny_qwen3_vl_dir, procedural_parquet, tmp_path):
    """Qwen3-VL's chat template adds no system turn: with lambda_v > 0 and no model.system_prompt
    r_visual = V / (S + eps) would be ~1e6 on every gated rollout. `avar rl` refuses before it
    starts Ray, naming model.system_prompt; with a system prompt, or lambda_v = 0, it is accepted."""
    import ray

    from avar_ray.attention import NoSystemPromptError
    from avar_ray.config import load_config
    from avar_ray.rl import run_rl
    from avar_ray.rl.pipeline import require_system_span_for_vars
    from avar_ray.rl.prompts import load_prompts

    overrides = [f"model.path={tiny_qwen3_vl_dir}", f"data.train={procedural_parquet}", f"rl.out={tmp_path / 'rl'}"]
    cfg = load_config(REPO / "configs" / "tiny_local.yaml", overrides)
    ray_before = ray.is_initialized()  # the suite's shared Ray may be up already
    with pytest.raises(NoSystemPromptError, match="model.system_prompt"):
        run_rl(cfg)
    assert ray.is_initialized() == ray_before  # refused before run_rl starts a Ray
    sample = load_prompts(cfg).samples[0]
    require_system_span_for_vars(load_config(REPO / "configs" / "tiny_local.yaml", overrides + ["model.system_prompt=You are helpful."]), sample)
    require_system_span_for_vars(load_config(REPO / "configs" / "tiny_local.yaml", overrides + ["rl.reward.lambda_v=0"]), sample)


def test_agto_on_a_template_without_a_system_turn_is_refused_at_start(tiny_qwen3_vl_dir, procedural_parquet, tmp_path):
    """SFT's L_sup = log(S mass + eps) would be 0 on every row without S: `avar sft` with
    sft.beta > 0 on Qwen3-VL and no model.system_prompt is refused before Ray or Ray Train
    starts, naming the key; a system prompt, or sft.beta = 0 (L_enh reads only V), is accepted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from avar_ray.attention import NoSystemPromptError
    from avar_ray.sft import run_sft
    from avar_ray.sft.data import require_system_turn_for_agto

    table = pq.read_table(procedural_parquet).slice(0, 2)
    data = tmp_path / "sft.parquet"
    pq.write_table(table.append_column("target", pa.array(["<think>t</think><answer>1</answer>"] * 2)), data)
    overrides = [f"model.path={tiny_qwen3_vl_dir}", f"sft.data={data}", f"sft.out={tmp_path / 'sft'}"]
    cfg = load_config(REPO / "configs" / "tiny_local.yaml", overrides)
    assert cfg.sft.beta > 0 and cfg.model.system_prompt is None
    ray_before = ray.is_initialized()
    with pytest.raises(NoSystemPromptError, match=r"sft\.beta = .* set model\.system_prompt.*or set sft\.beta=0"):
        run_sft(cfg)
    assert ray.is_initialized() == ray_before  # refused before run_sft starts a Ray
    assert not (tmp_path / "sft").exists()
    for extra in (["model.system_prompt=You are helpful."], ["sft.beta=0"]):
        accepted = load_config(REPO / "configs" / "tiny_local.yaml", overrides + extra)
        require_system_turn_for_agto([str(data)], accepted.model, accepted.sft.beta)


class _NoGeneration:
    """An engine that fails the test if the eval asks it for anything: the guard must come first."""

    def __getattr__(self, name):
        raise AssertionError(f"avar eval reached the engine ({name}) before its system-span check")


def test_eval_without_a_system_turn_says_so_before_generating(tiny_qwen3_vl_dir, procedural_parquet, tmp_path):
    """VAS = V / S of every sample: `avar eval` on Qwen3-VL without model.system_prompt stops before
    it generates (it used to generate everything, then fail in the statistics pass)."""
    from avar_ray.attention import NoSystemPromptError
    from avar_ray.eval.runner import run_eval

    cfg = load_config(REPO / "configs" / "tiny_local.yaml", ["eval.max_samples=2"])
    with pytest.raises(NoSystemPromptError, match=r"avar eval .* set model\.system_prompt"):
        run_eval(tiny_qwen3_vl_dir, [procedural_parquet], tmp_path / "eval", cfg, llm=_NoGeneration())
    assert not (tmp_path / "eval" / "progress.jsonl").exists()
