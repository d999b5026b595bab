"""The Ray Train worker loop of the cold-start SFT: DeepSpeed ZeRO over Ray's process group,
loss = LM + alpha·L_enh + beta·L_sup (SPEC.md §4), per-step metrics, checkpoints, HF export.

Every rank runs this function; rank 0 also writes the metrics and the exported model.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from avar_ray.sft.data import encode_rows
from avar_ray.sft.ds_config import deepspeed_config, lr_scheduler, steps_per_epoch
from avar_ray.tracking import Tracker

EXPORT_NOTE = "avar_sft.json"  # written into final/ last (after the weights and the processor): the export is whole
# Summed over the micro-batches of a step and over ranks, then divided by the count.
_MEAN_KEYS = ("loss", "lm_loss", "l_enh", "l_sup", "vas", "alpha_img", "alpha_sys")


def progress_line(record: dict) -> str:
    def f(key: str) -> str:
        value = record.get(key)
        return "n/a" if value is None else f"{value:.3g}"

    return f"loss {f('loss')} lm {f('lm_loss')} vas {f('vas')}"


def vision_parameters(model) -> list[torch.nn.Parameter]:
    """The vision tower's parameters (Qwen2/2.5-VL ``visual``, LLaVA-style ``vision_tower``)."""
    return [p for n, p in model.named_parameters() if {"visual", "vision_tower"} & set(n.split("."))]


def _skip_shm_kernel_build() -> None:
    # DeepSpeed compiles a shared-memory all-reduce kernel on first init on CPU (~35 s on two
    # cores); only its inference all-reduce uses it, training goes through gloo.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _micro_step(engine, processor, rows, sft, attention, num_layers: int, system_prompt: str | None) -> dict:
    """Forward + backward of one micro-batch; returns its metric sums."""
    from avar_ray.attention import AttentionContext, agto_losses, vas_from_stats

    encoded, labels = encode_rows(processor, rows, system_prompt)
    encoded = encoded.to(engine.device)
    dtype = next(engine.module.parameters()).dtype
    if "pixel_values" in encoded.inputs:
        encoded.inputs["pixel_values"] = encoded.inputs["pixel_values"].to(dtype)
    ctx = AttentionContext.from_spans(encoded.spans, query=sft.agto_query, layers=attention.layers,
                                      chunk_size=attention.chunk_size, num_layers=num_layers)
    out = engine(**encoded.inputs, labels=labels.to(engine.device), avar_context=ctx, use_cache=False)
    stats = ctx.stats()
    agto = agto_losses(stats, eps=attention.eps)
    lm = out.loss
    loss = lm + sft.alpha * agto.enh + sft.beta * agto.sup if (sft.alpha or sft.beta) else lm
    engine.backward(loss)
    vas = vas_from_stats(stats.detach())

    def finite_mean(x: torch.Tensor) -> float:
        x = x[torch.isfinite(x)]
        return float(x.mean()) if x.numel() else math.nan

    return {"loss": float(loss.detach()), "lm_loss": float(lm.detach()), "l_enh": float(agto.enh.detach()),
            "l_sup": float(agto.sup.detach()), "vas": finite_mean(vas.vas), "alpha_img": finite_mean(vas.alpha_img),
            "alpha_sys": finite_mean(vas.alpha_sys), "tokens": float(labels.ne(-100).sum())}


def _all_reduce_mean(sums: dict, count: int) -> dict:
    """Means over ranks and micro-batches (NaN metrics count as missing)."""
    import torch.distributed as dist

    keys = list(_MEAN_KEYS)
    values = torch.tensor([[0.0 if math.isnan(sums[k]) else sums[k], 0.0 if math.isnan(sums[k]) else 1.0]
                           for k in keys] + [[sums["tokens"], float(count)]], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(values)
    out = {k: (float(values[i, 0] / values[i, 1]) if values[i, 1] else math.nan) for i, k in enumerate(keys)}
    out["tokens"] = float(values[-1, 0])
    return out


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    from avar_ray import checkpoints
    from avar_ray.deepspeed_config import trained_dtype
    from avar_ray.modeling import export_hf, load_model, load_processor

    sft, model_path, total = config["sft"], config["model_path"], config["total_steps"]
    out = Path(config["out"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _skip_shm_kernel_build()
    deepspeed.init_distributed(dist_backend=config["backend"])  # reuses Ray Train's process group
    torch.manual_seed(sft.seed)

    ds_config = deepspeed_config(sft, config["model"].dtype)
    model = load_model(model_path, dtype="float32")  # the master weights; DeepSpeed casts a half copy
    model.config.use_cache = False
    if sft.gradient_checkpointing:  # each decoder and vision block recomputed in the backward (avar plan)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if sft.freeze_vision:
        for p in vision_parameters(model):
            p.requires_grad_(False)
    processor = load_processor(model_path, config["model"])  # model.min_pixels / max_pixels
    num_layers = model.config.get_text_config().num_hidden_layers
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           lr_scheduler=lr_scheduler(sft, total))
    engine.train()

    ckpt_dir = out / "checkpoints"
    step = 0
    if sft.resume and (ckpt_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step = int(client["step"])
    tracker = (Tracker(config["tracking"], out, "sft", config["run_config"], step, total, progress_line,
                       always=("jsonl",)) if rank == 0 else None)
    micro_per_epoch = steps_per_epoch(config["rows"], world, sft.micro_batch_size, sft.grad_accum) * sft.grad_accum
    skip = (step * sft.grad_accum) % micro_per_epoch  # micro-batches of this epoch done before the checkpoint
    shard = ray.train.get_dataset_shard("train")
    sums, count, t0, last = None, 0, time.perf_counter(), {}
    global_batch = sft.micro_batch_size * sft.grad_accum * world

    def save(tag_step: int) -> None:
        engine.save_checkpoint(str(ckpt_dir), tag=checkpoints.tag(tag_step), client_state={"step": tag_step})

    while step < total:
        batches = shard.iter_batches(batch_size=sft.micro_batch_size, batch_format="pyarrow", drop_last=True)
        for i, batch in enumerate(batches):
            if i >= micro_per_epoch or step >= total:
                break
            if skip:
                skip -= 1
                continue
            m = _micro_step(engine, processor, batch.to_pylist(), sft, config["attention"], num_layers,
                            config["model"].system_prompt)
            lr = float(engine.get_lr()[0])  # the LR of this update (the scheduler steps inside engine.step)
            engine.step()  # an optimizer step only at the accumulation boundary
            sums = m if sums is None else {k: sums[k] + m[k] for k in m}
            count += 1
            if count < sft.grad_accum:
                continue
            step += 1
            last = _all_reduce_mean(sums, count)
            elapsed = time.perf_counter() - t0
            grad_norm = engine.get_global_grad_norm()
            last.update(lr=lr, samples_per_s=global_batch / elapsed, step_time_s=elapsed,
                        grad_norm=float(grad_norm) if grad_norm is not None else math.nan)
            if tracker is not None:
                tracker.log(step, last)
            if sft.save_every and step % sft.save_every == 0:
                save(step)
            sums, count, t0 = None, 0, time.perf_counter()

    if not (sft.save_every and step % sft.save_every == 0):
        save(step)
    info = {"steps": step, "source_model": model_path, "alpha": sft.alpha, "beta": sft.beta,
            "agto_query": sft.agto_query, "zero_stage": sft.zero_stage, "precision": trained_dtype(ds_config)}
    export_hf(engine, processor, out / "final", sft.zero_stage, rank, {EXPORT_NOTE: info})
    if tracker is not None:
        tracker.close()
    ray.train.report({"step": step, **{k: v for k, v in last.items() if not (isinstance(v, float) and math.isnan(v))}})
