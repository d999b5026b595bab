"""Each perception method's own figure, read on any model (``bench/toy_science.py`` reads it on
every GRPO arm's final model, so each method's signal is measured on the others' models too).

On a model's own eval responses (an eval run's ``samples.jsonl``, the samples from the eval
data), in this process: PAPO's masked-vs-real KL (its k3 estimator per token, patches masked
with PAPO's 0.6) and VPPO's mean token dependency (VPPO's 0.5), both over every response token,
the masks seeded like a learner's at step 0 (``actors.perception``, ``avar_ray.perception``).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def perception_figures(model_dir: str, eval_data: list[str], samples_jsonl: Path, batch: int = 8) -> dict:
    import torch

    from actors.learner_batches import PromptCache
    from actors.perception import PerceptionPass
    from actors.policy import banned_token_ids, forward_logprobs
    from actors.records import TrainItem
    from avar_ray.config import ModelConfig, PerceptionConfig, RLConfig
    from avar_ray.data.readers import read_samples
    from avar_ray.modeling import load_model, load_processor
    from avar_ray.perception import dependency, low_var_kl

    processor = load_processor(model_dir, ModelConfig(path=model_dir))
    model = load_model(model_dir, dtype="float32").eval()
    banned = banned_token_ids(processor)
    samples = {s.id: s for path in eval_data for s in read_samples(path)[0]}
    rows = [json.loads(line) for line in Path(samples_jsonl).read_text().splitlines() if line.strip()]
    items = [TrainItem(samples[r["id"]], ids, 0.0, [])
             for r in rows if r["id"] in samples
             for ids in [processor.tokenizer.encode(r["response"], add_special_tokens=False)] if ids]

    def logprobs(mdl, encoded, its, **kwargs):
        return forward_logprobs(mdl, encoded, [len(it.response_ids) for it in its], 1.0, banned, **kwargs)

    learner, cache = SimpleNamespace(engine=model, _logprobs=logprobs), PromptCache(processor)
    masks = {"papo": PerceptionPass(processor, RLConfig(perception=PerceptionConfig(papo_coef=0.02))),
             "vppo": PerceptionPass(processor, RLConfig(perception=PerceptionConfig(vppo=True)))}
    sums, tokens = {"papo_kl": 0.0, "vppo_dependency": 0.0}, 0
    with torch.no_grad():
        for start in range(0, len(items), batch):
            part = items[start:start + batch]
            encoded, prompts = cache.encode(part)
            real = logprobs(model, encoded, part)[0]
            papo = torch.tensor(sum(masks["papo"].score_logprobs(learner, prompts, part, 0), []))
            vppo = torch.tensor(sum(masks["vppo"].score_logprobs(learner, prompts, part, 0), []))
            flat = torch.cat([real[b, :len(it.response_ids)] for b, it in enumerate(part)])
            sums["papo_kl"] += float(low_var_kl(flat, papo, low=-10.0).sum())
            sums["vppo_dependency"] += float(dependency(flat, vppo).sum())
            tokens += flat.numel()
    return {**{k: v / max(tokens, 1) for k, v in sums.items()}, "tokens": tokens, "responses": len(items)}
