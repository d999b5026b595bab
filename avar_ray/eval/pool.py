"""The work on one batch of samples (statistics, score, heatmap grid), and the same work scaled
out on Ray Data: an actor pool of vLLM engines generates (``eval.num_engines`` actors,
``eval.engine_gpus`` each) and an actor pool of transformers models computes the statistics
(``eval.stats_workers`` actors, ``eval.stats_gpus`` each), data-parallel over the cluster's
GPUs and nodes. Under the intervention the statistics actors also generate (vLLM cannot apply
it). Batches of ``eval.batch_size`` rows stream through both pools; finished samples come
back to the driver as they finish, which appends them to the progress file.
"""
from __future__ import annotations

import json
import logging
from typing import Iterator, Optional, Sequence

import pyarrow as pa

from avar_ray.attention import Intervention
from avar_ray.eval.attention_pass import SPANS, attention_rows
from avar_ray.eval.benchmarks import EvalItem, prepare_item
from avar_ray.eval.generation import Generation, hf_generate, vllm_generate
from avar_ray.eval.heatmap import response_patch_attention
from avar_ray.eval.scoring import score_response

log = logging.getLogger("avar_ray.eval")


def record(item: EvalItem, gen: Generation, attention: dict) -> dict:
    s = item.sample
    return {"benchmark": item.benchmark, "id": s.id, "question": s.question, "answer": s.answer,
            "answer_type": s.answer_type, "choices": list(s.choices), "response": gen.text,
            "response_tokens": len(gen.ids), "finish_reason": gen.finish_reason, **score_response(s, gen.text),
            "vas": attention["user"]["vas"], "attention": {name: attention[name] for name in SPANS},
            "prompt_ids_match": attention["prompt_ids_match"]}


def finish_batch(model, processor, items: Sequence[EvalItem], gens: Sequence[Generation], keys: Sequence[str],
                 heat: Sequence[bool], intervention: Optional[Intervention], attn_cfg) -> list[dict]:
    """Progress rows (``avar_ray.eval.progress``) of one batch: the statistics pass, the score
    and, for the samples picked for a figure, the response's attention grid on the first image."""
    attention = attention_rows(model, processor, items, gens, intervention, attn_cfg.layers, attn_cfg.chunk_size,
                               max(1, len(items)))
    rows = []
    for item, gen, att, key, h in zip(items, gens, attention, keys, heat):
        if "error" in att:
            rows.append({"key": key, "error": att["error"]})
            continue
        row = {"key": key, "record": record(item, gen, att)}
        if h:
            try:
                row["heatmap"] = response_patch_attention(model, processor, item, gen, intervention,
                                                          attn_cfg.layers)[0].tolist()
            except (RuntimeError, ValueError) as exc:  # a figure is not worth the sample
                log.warning("heatmap of %s failed: %s", key, exc)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- Ray Data
class _Prepared:
    """Turns the rows of a batch back into EvalItems (images decoded, prompt templated)."""

    def __init__(self, model_dir: str, model_cfg, eval_cfg) -> None:
        from avar_ray.modeling import load_processor

        self.processor = load_processor(model_dir, model_cfg)
        self.system_prompt = model_cfg.system_prompt
        self.max_prompt = model_cfg.max_model_len - eval_cfg.max_new_tokens

    def items(self, rows: list[dict]) -> list[EvalItem]:
        from avar_ray.data.schema import from_row

        return [prepare_item(self.processor, r["benchmark"], from_row(r), self.system_prompt, self.max_prompt)
                for r in rows]


class GenerateStage(_Prepared):
    """One vLLM engine per actor (``avar_ray.engines``: the model section's resolution). Ray
    ends the stage's actors by killing their child processes, so no shutdown runs here: the
    engine's janitor (``avar_ray.engine_janitor``) then unlinks its shared-memory queues."""

    def __init__(self, model_dir: str, model_cfg, eval_cfg, max_images: int) -> None:
        from avar_ray.engines import start_llm

        super().__init__(model_dir, model_cfg, eval_cfg)
        self.cfg = eval_cfg
        self.llm = start_llm(model_cfg, path=model_dir, max_images=max_images, enforce_eager=eval_cfg.enforce_eager,
                             seed=eval_cfg.seed, gpu_memory_utilization=eval_cfg.gpu_memory_utilization)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        gens = vllm_generate(self.llm, self.items(rows), self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.seed)
        for row, gen in zip(rows, gens):
            row["generation"] = json.dumps({"ids": gen.ids, "text": gen.text, "finish_reason": gen.finish_reason,
                                            "prompt_ids": gen.prompt_ids})
        return pa.Table.from_pylist(rows)


class StatsStage(_Prepared):
    """One transformers model per actor: generation under the intervention, then the statistics."""

    def __init__(self, model_dir: str, model_cfg, eval_cfg, attn_cfg, intervention: Optional[Intervention]) -> None:
        from avar_ray.modeling import load_model, resolve_device

        super().__init__(model_dir, model_cfg, eval_cfg)
        self.cfg, self.attn_cfg, self.intervention = eval_cfg, attn_cfg, intervention
        self.model = load_model(model_dir, dtype=model_cfg.dtype).to(resolve_device(eval_cfg.device)).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        items = self.items(rows)
        if self.intervention is not None:
            c = self.cfg
            gens = hf_generate(self.model, self.processor, items, self.intervention, c.max_new_tokens, c.temperature,
                               c.seed, c.batch_size)
        else:
            gens = [Generation(**json.loads(r["generation"])) for r in rows]
        done = finish_batch(self.model, self.processor, items, gens, [r["key"] for r in rows],
                            [r["heat"] for r in rows], self.intervention, self.attn_cfg)
        return pa.Table.from_pylist([{"result": json.dumps(d)} for d in done])


def run_on_ray(model_dir: str, items: Sequence[EvalItem], keys: Sequence[str], heat: Sequence[bool], cfg,
               intervention: Optional[Intervention]) -> Iterator[list[dict]]:
    """Yield the progress rows of ``items`` batch by batch, as the actor pools finish them."""
    import ray.data

    from avar_ray.data.schema import to_row
    from avar_ray.ray_utils import init_ray

    init_ray(cfg.ray)
    ecfg = cfg.eval
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [{"key": k, "benchmark": it.benchmark, "heat": h, **to_row(it.sample)} for it, k, h in zip(items, keys, heat)]
    bs = ecfg.batch_size
    # one block per batch: the batches are the in-process eval's (the same consecutive rows)
    ds = ray.data.from_arrow([pa.Table.from_pylist(rows[i:i + bs]) for i in range(0, len(rows), bs)])
    if intervention is None:
        ds = ds.map_batches(GenerateStage, batch_size=bs, batch_format="pyarrow",
                            fn_constructor_kwargs=dict(model_dir=model_dir, model_cfg=cfg.model, eval_cfg=ecfg,
                                                       max_images=max(len(it.images) for it in items)),
                            compute=ray.data.ActorPoolStrategy(size=ecfg.num_engines),
                            num_cpus=ecfg.engine_cpus, num_gpus=ecfg.engine_gpus)
    ds = ds.map_batches(StatsStage, batch_size=bs, batch_format="pyarrow",
                        fn_constructor_kwargs=dict(model_dir=model_dir, model_cfg=cfg.model, eval_cfg=ecfg,
                                                   attn_cfg=cfg.attention, intervention=intervention),
                        compute=ray.data.ActorPoolStrategy(size=ecfg.stats_workers),
                        num_cpus=ecfg.stats_cpus, num_gpus=ecfg.stats_gpus)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield [json.loads(r) for r in batch.column("result").to_pylist()]
