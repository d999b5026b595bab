"""One system prompt: ``model.system_prompt`` is the system turn of the cold-start rows SFT
trains on, of the RL prompts and of eval, so a model is never trained on one prompt and
sampled or measured under another (the per-stage keys are gone)."""
from __future__ import annotations

import pytest

from avar_ray.config import ConfigError, ModelConfig, load_config
from avar_ray.data.procedural import generate_samples
from avar_ray.data.schema import to_row

PROMPT = "Look at the image before you answer."


def _system_text(processor, encoded, row: int = 0) -> str:
    ids = encoded.inputs["input_ids"][row][encoded.spans.system[row]]
    return processor.tokenizer.decode(ids)


def test_stage_keys_are_gone():
    assert load_config(None, [f"model.system_prompt={PROMPT}"]).model.system_prompt == PROMPT
    for key in ("rl.system_prompt", "eval.system_prompt"):
        with pytest.raises(ConfigError, match=f"{key}: unknown key"):
            load_config(None, [f"{key}=x"])


def test_sft_rl_and_eval_prompts_carry_the_same_system_turn(tiny_model_dir):
    from avar_ray.eval.benchmarks import prepare_item
    from avar_ray.modeling import encode_batch, load_processor
    from avar_ray.rl.prompts import prompt_tokens
    from avar_ray.sft.data import TokenLengths, encode_rows

    model = ModelConfig(str(tiny_model_dir), system_prompt=PROMPT)
    processor = load_processor(model.path, model)
    sample = generate_samples(1, seed=2)[0]
    row = dict(to_row(sample), target="<think>a</think><answer>b</answer>")

    sft, _ = encode_rows(processor, [row], model.system_prompt)
    assert PROMPT in _system_text(processor, sft)
    item = prepare_item(processor, "proc", sample, model.system_prompt, 900)  # eval's prompt
    ev = encode_batch(processor, [item.messages], [item.images])
    assert _system_text(processor, ev) == _system_text(processor, sft)
    # the RL prompt filter counts the same prompt (its length differs from the default turn's)
    assert prompt_tokens(processor, sample, model.system_prompt) == item.prompt_len
    assert prompt_tokens(processor, sample, None) != item.prompt_len

    # SFT's length filter (the Ray Data stage) measures rows with the configured prompt
    import pyarrow as pa

    table = pa.Table.from_pylist([row])
    with_prompt = TokenLengths(model)(table).column("num_tokens")[0].as_py()
    default = TokenLengths(ModelConfig(model.path))(table).column("num_tokens")[0].as_py()
    assert with_prompt == int(sft.inputs["attention_mask"].sum()) != default
