"""Exact S/U/V/R spans on hand-built conversations.

The expected masks are built independently of ``spans.py``: the conversation is assembled
piece by piece (each piece tokenized on its own and labelled by hand), and the processor's
tokenization of the whole conversation must equal the concatenation before the labels are
compared.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from avar_ray.modeling import encode_batch, load_processor
from avar_ray.spans import TemplateIds, UnsupportedTemplateError, find_spans, spans_for

DEFAULT_SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(str(tiny_model_dir))


def _pieces(tok, system, user_parts, response, n_image_tokens):
    """(token ids, labels) of one conversation, assembled by hand (``system`` None: no system
    turn, as Qwen3-VL's template renders it). Labels: S U V R - ."""
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    special = tok.convert_tokens_to_ids
    out: list[tuple[list[int], str]] = []
    if system is not None:
        out.append(([special("<|im_start|>")] + enc("system\n" + system) + [special("<|im_end|>")] + enc("\n"), "S"))
    out.append(([special("<|im_start|>")] + enc("user\n"), "U"))
    image_index = 0
    for part in user_parts:
        if part == "<image>":
            out.append(([special("<|vision_start|>")], "-"))
            out.append(([special("<|image_pad|>")] * n_image_tokens[image_index], "V"))
            out.append(([special("<|vision_end|>")], "-"))
            image_index += 1
        else:
            out.append((enc(part), "U"))
    out.append(([special("<|im_end|>")] + enc("\n"), "U"))
    out.append(([special("<|im_start|>")] + enc("assistant\n"), "-"))
    if response is not None:
        out.append((enc(response) + [special("<|im_end|>")], "R"))
        out.append((enc("\n"), "-"))
    ids = [i for piece, _ in out for i in piece]
    labels = "".join(label * len(piece) for piece, label in out)
    return ids, labels


def _labels(spans, row, length_or_slice):
    masks = {"S": spans.system, "U": spans.user, "V": spans.visual, "R": spans.response}
    out = []
    for pos in length_or_slice:
        hits = [k for k, m in masks.items() if bool(m[row, pos])]
        assert len(hits) <= 1, f"position {pos} is in several spans: {hits}"
        out.append(hits[0] if hits else "-")
    return "".join(out)


def _messages(system, user_parts):
    content = [{"type": "image"} if p == "<image>" else {"type": "text", "text": p} for p in user_parts]
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": content}]


def _image_tokens(processor, images):
    grid = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    merge = processor.image_processor.merge_size ** 2
    return [int(g.prod()) // merge for g in grid]


CASES = [
    # (explicit system prompt or None for the default one, user parts, image sizes, response)
    (None, ["<image>", "What colour is the circle?"], [(112, 112)], "<think>red</think><answer>A</answer>"),
    ("Answer briefly.", ["<image>", "How many squares?"], [(112, 112)], "<answer>3</answer>"),
    (None, ["Compare", "<image>", "and", "<image>", "Which is bigger?"], [(112, 112), (56, 112)], "<answer>B</answer>"),
    ("You grade.", ["<image>", "<image>", "Left or right?"], [(84, 84), (112, 56)], None),
]


@pytest.mark.parametrize("system,user_parts,sizes,response", CASES)
def test_spans_match_hand_built_conversation(processor, system, user_parts, sizes, response):
    images = [Image.new("RGB", s, (200, 30, 30)) for s in sizes]
    expected_ids, expected = _pieces(processor.tokenizer, system if system is not None else DEFAULT_SYSTEM,
                                     user_parts, response, _image_tokens(processor, images))
    enc = encode_batch(processor, [_messages(system, user_parts)], [images],
                       response_texts=[response] if response is not None else None)
    ids = enc.inputs["input_ids"][0].tolist()
    assert ids == expected_ids, "the hand-built conversation must tokenize like the chat template"
    assert _labels(enc.spans, 0, range(len(ids))) == expected
    assert int(enc.spans.visual.sum()) == sum(_image_tokens(processor, images))


@pytest.mark.parametrize("system,user_parts,sizes,response", CASES)
def test_qwen3_vl_spans_match_hand_built_conversation(tiny_qwen3_vl_dir, system, user_parts, sizes, response):
    """Qwen3-VL's template has no default system turn: S is empty unless the caller gives one."""
    processor = load_processor(str(tiny_qwen3_vl_dir))
    images = [Image.new("RGB", s, (200, 30, 30)) for s in sizes]
    expected_ids, expected = _pieces(processor.tokenizer, system, user_parts, response,
                                     _image_tokens(processor, images))
    enc = encode_batch(processor, [_messages(system, user_parts)], [images],
                       response_texts=[response] if response is not None else None)
    ids = enc.inputs["input_ids"][0].tolist()
    assert ids == expected_ids, "the hand-built conversation must tokenize like the chat template"
    assert _labels(enc.spans, 0, range(len(ids))) == expected
    assert int(enc.spans.system.sum()) == (0 if system is None else expected.count("S"))
    assert int(enc.spans.visual.sum()) == sum(_image_tokens(processor, images))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_spans_equal_unpadded_rows(processor, side):
    convs, imgs, responses = [], [], []
    for system, parts, sizes, response in CASES[:3]:
        convs.append(_messages(system, parts))
        imgs.append([Image.new("RGB", s, (10, 200, 10)) for s in sizes])
        responses.append(response)
    batch = encode_batch(processor, convs, imgs, response_texts=responses, padding_side=side)
    mask = batch.inputs["attention_mask"].bool()
    assert not bool(mask.all()), "rows differ in length, so the batch must hold padding"
    for row in range(len(convs)):
        single = encode_batch(processor, [convs[row]], [imgs[row]], response_texts=[responses[row]])
        want = _labels(single.spans, 0, range(single.inputs["input_ids"].shape[1]))
        positions = mask[row].nonzero().flatten().tolist()
        assert _labels(batch.spans, row, positions) == want
        pad_positions = (~mask[row]).nonzero().flatten().tolist()
        assert _labels(batch.spans, row, pad_positions) == "-" * len(pad_positions)
        if side == "left" and pad_positions:
            assert max(pad_positions) < min(positions)


def test_response_ids_without_closing_marker(processor):
    """A generation cut by max_tokens has no <|im_end|>: every generated token is in R."""
    convs = [_messages(None, ["<image>", "Count."])]
    enc = encode_batch(processor, convs, [[Image.new("RGB", (112, 112))]], response_ids=[[10, 11, 12, 13]])
    assert enc.spans.response[0].nonzero().flatten().tolist() == [enc.prompt_lengths[0] + i for i in range(4)]


def test_qwen2_vl_processor_same_spans(processor, tiny_model_dir):
    """Qwen2-VL shares the template markers: its processor gives the same segmentation."""
    from transformers import Qwen2VLProcessor

    q2 = Qwen2VLProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                          video_processor=processor.video_processor, chat_template=processor.chat_template)
    images = [Image.new("RGB", (112, 112))]
    conv = _messages("Be terse.", ["<image>", "Which colour?"])
    a = encode_batch(processor, [conv], [images], response_texts=["<answer>C</answer>"])
    b = encode_batch(q2, [conv], [images], response_texts=["<answer>C</answer>"])
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    for name in ("system", "user", "visual", "response"):
        assert torch.equal(getattr(a.spans, name), getattr(b.spans, name))


def test_query_sets(processor):
    enc = encode_batch(processor, [_messages(None, ["<image>", "Hi"])], [[Image.new("RGB", (56, 56))]],
                       response_texts=["<answer>1</answer>"])
    s = enc.spans
    assert torch.equal(s.query("user_visual"), s.user | s.visual)
    assert torch.equal(s.query("response"), s.response)
    with pytest.raises(ValueError, match="query span"):
        s.query("system")


def test_unsupported_template_is_a_clear_error():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["hello world"], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    with pytest.raises(UnsupportedTemplateError, match="<\\|im_start\\|>"):
        spans_for(tok, torch.tensor([[1, 2, 3]]))


def test_unknown_role_and_missing_turns_are_errors(processor):
    t = TemplateIds.from_tokenizer(processor)
    with pytest.raises(UnsupportedTemplateError, match="no <\\|im_start\\|>"):
        find_spans(torch.tensor([[5, 6, 7]]), t)
    tool = [t.im_start] + processor.tokenizer.encode("tool\nx", add_special_tokens=False) + [t.im_end]
    with pytest.raises(UnsupportedTemplateError, match="unknown role"):
        find_spans(torch.tensor([tool]), t)
