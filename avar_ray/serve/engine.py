"""What one Serve replica runs per request: generate an answer, then measure where it looked.

Generation is transformers ``generate``, not vLLM, on purpose: the VAS telemetry needs the
transformers model anyway (our ``avar`` attention computes the statistics), per-request
intervention parameters need transformers too (vLLM's kernels cannot take the key bias), and
one model per replica starts in seconds on CPU (a vLLM engine would add ~20-40 s and a second
copy of the weights). The same functions as ``avar eval`` do the work, so served and evaluated
VAS are one computation.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Optional, Sequence

from avar_ray.attention.context import validate_layers
from avar_ray.config import ModelConfig
from avar_ray.data.fields import RowError
from avar_ray.data.schema import Sample
from avar_ray.eval.attention_pass import attention_rows
from avar_ray.eval.benchmarks import prepare_item
from avar_ray.eval.generation import hf_generate
from avar_ray.modeling import resolve_device
from avar_ray.modeling import load_model, load_processor
from avar_ray.serve.validation import AnswerRequest, RequestError
from rewards import extract_answer

ATTENTION_KEYS = ("vas", "alpha_img", "eps_img", "alpha_sys", "band", "per_layer", "per_layer_alpha_img")


class AnswerEngine:
    """``model``: the model section (dtype, context, resolution and system prompt, as in eval);
    ``model_dir`` may be another checkpoint than ``model.path``."""

    def __init__(self, model_dir: str, model: ModelConfig, device: str, layers: Optional[Sequence[int]],
                 chunk_size: Optional[int]):
        self.model_dir = str(model_dir)
        self.device = resolve_device(device)
        self.processor = load_processor(self.model_dir, model)
        self.model = load_model(self.model_dir, dtype=model.dtype).to(self.device).eval()
        self.num_layers = self.model.config.get_text_config().num_hidden_layers
        self.max_model_len = model.max_model_len
        self.system_prompt = model.system_prompt
        self.layers = layers
        self.chunk_size = chunk_size
        self._lock = threading.Lock()  # one forward at a time: requests queue, the CPU is not oversubscribed

    def answer(self, req: AnswerRequest) -> dict[str, Any]:
        start = time.perf_counter()
        intervention = req.intervention
        if intervention is not None and intervention.layers is not None:
            try:
                validate_layers(intervention.layers, self.num_layers, "intervention layers")
            except ValueError as exc:
                raise RequestError(400, "intervention.layers", str(exc)) from None
        sample = Sample(id="request", question=req.question, answer="", answer_type="text",
                        images=[req.image_bytes], choices=req.choices, source="serve")
        try:
            item = prepare_item(self.processor, "serve", sample, self.system_prompt,
                                self.max_model_len - req.max_new_tokens, images=[req.image])
        except RowError as exc:  # the prompt (question + image tokens) leaves no room for the answer
            raise RequestError(400, "question", f"{exc.detail} (model context {self.max_model_len} tokens, "
                                                f"max_new_tokens {req.max_new_tokens})") from None
        with self._lock:
            gen = hf_generate(self.model, self.processor, [item], intervention, req.max_new_tokens, 0.0, 0, 1)[0]
            attention = attention_rows(self.model, self.processor, [item], [gen], intervention, self.layers,
                                       self.chunk_size, 1)[0]
        if "error" in attention:  # the banned template tokens make this unreachable in practice
            raise RuntimeError(f"attention pass failed on the generated response: {attention['error']}")
        response = attention["response"]
        return {
            "answer": extract_answer(gen.text), "response": gen.text, "finish_reason": gen.finish_reason,
            "response_tokens": len(gen.ids), **{k: response[k] for k in ATTENTION_KEYS},
            "layers": response["layers"], "visual_tokens": response["visual_tokens"],
            "user": {k: attention["user"][k] for k in ATTENTION_KEYS},
            "intervention": None if intervention is None else {
                "a_img": intervention.a_img, "a_sys": intervention.a_sys,
                "layers": None if intervention.layers is None else list(intervention.layers)},
            "model": self.model_dir, "seconds": round(time.perf_counter() - start, 3),
        }
