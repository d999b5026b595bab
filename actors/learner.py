"""A learner rank (the driver's side, ``LearnerGroup``, is ``actors.learner_group``): N such Ray
actors in one placement group form a torch.distributed group
(gloo on CPU, nccl on GPU), each running ``deepspeed.initialize`` (ZeRO stage ``rl.zero_stage``).

Per step the learners make up to two passes over the step's rollouts, data-parallel (the
rollouts split over the ranks by length, ``avar_ray.grpo.plan_step`` / ``plan_score``):

* ``score``: a no-grad forward through the ``avar`` attention gives, for the rollouts that need
  it (the correct ones under SPEC.md §5's gate), the response-span attention statistics (r_visual
  before the gate) and, with several optimizer steps per update, the old log-probs of every
  rollout (the policy before the update, the PPO ratio's denominator). With one optimizer step
  (``LearnerGroup.old_from_train``) the update's own forward gives those, detached, and this
  pass runs only on the rollouts that want statistics: none when no rollout does. Every prompt's
  token ids are checked against vLLM's here (an encode, cached for the update: no forward).
* ``train``: ``rl.ppo_epochs`` x ``rl.mini_batches`` optimizer steps with verl's clipped loss
  (``avar_ray.grpo``), optional truncated IS correction (``rl.tis_cap``) and KL to a frozen
  reference (only when ``rl.kl_coef > 0``; a ZeRO-3 engine of its own, sharded like the policy).

Memory: log-probs from the response positions' hidden states in LM-head chunks (``actors.policy``),
token-budget micro-batches (``rl.max_tokens_per_micro_batch``), ``rl.gradient_checkpointing``,
and under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` and filled tensor by tensor
(``actors.learner_load.load_partitioned``): no rank ever holds the whole model. Rank 0 gathers the (trainable)
weights bucket-wise and publishes them for the weight sync.

Data plane: each rank fetches, decodes and preprocesses a prompt (its images) once per step
for both passes, from a per-step cache (``actors.learner_batches.PromptCache``) cleared when
the step's update is done; micro-batches are assembled from the cached tensors.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from actors.learner_batches import PromptCache
from actors.perception import PerceptionPass
from actors.policy import banned_token_ids, forward_logprobs, pad_rows
from actors.records import ScoredPass, TrainItem
from actors.weight_sync import (MIB, WeightHandle, broadcast_table, bucket_names, make_weight_group,
                                publish_object_store, send_broadcast, trainable_only)
from avar_ray.ray_utils import free_port

log = logging.getLogger(__name__)

CLIENT_STATE_KEY = "avar_client_state"


class Learner:
    """One rank of the learner group; ``rl``, ``model`` and ``attention`` are the config sections
    (r_visual's layers, epsilon and statistics method are ``attention.*``, as in eval and SFT)."""

    def __init__(self, rl, model, attention, rank: int, world_size: int):
        self.rl, self.model_cfg, self.attention, self.rank, self.world_size = rl, model, attention, rank, world_size
        # Ray's logical GPUs without CUDA (a simulated cluster on CPU, ray.cluster_utils.Cluster): gloo on CPU
        self.use_gpu = rl.placement.learner_gpus > 0 and torch.cuda.is_available()
        if rl.placement.learner_gpus > 0 and not self.use_gpu:
            log.warning("learner rank %d: rl.placement.learner_gpus=%g but CUDA is not available here; "
                        "running on CPU with gloo", rank, rl.placement.learner_gpus)
        self.engine = self.reference = None

    def address(self) -> tuple[str, int, str]:
        import ray

        return ray.util.get_node_ip_address(), free_port(""), ray.get_runtime_context().get_node_id()

    def _load(self, config: dict):
        from avar_ray.deepspeed_config import trained_dtype
        from avar_ray.modeling import load_model

        dtype = trained_dtype(config)  # model.dtype, or float32 where the accelerator lacks it
        if self.rl.zero_stage == 3:
            from actors.learner_load import load_partitioned

            return load_partitioned(self.model_cfg.path, dtype, config)
        # attn "avar": plain SDPA unless a forward carries an attention context (the statistics)
        return load_model(self.model_cfg.path, dtype=dtype, attn_implementation="avar")

    def setup(self, master_addr: str, master_port: int, local_rank: int, local_world_size: int) -> dict:
        import deepspeed

        from avar_ray.deepspeed_config import deepspeed_config
        from avar_ray.modeling import load_processor

        rl = self.rl
        start = time.perf_counter()
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port),
                          # a GPU actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES)
                          LOCAL_RANK=str(0 if self.use_gpu else local_rank),
                          LOCAL_WORLD_SIZE=str(1 if self.use_gpu else local_world_size))
        torch.manual_seed(rl.seed)
        deepspeed.init_distributed(dist_backend="nccl" if self.use_gpu else "gloo", auto_mpi_discovery=False)
        self.processor = load_processor(self.model_cfg.path, self.model_cfg)  # the resolution vLLM uses
        self.banned = banned_token_ids(self.processor)
        self.prompts = PromptCache(self.processor, self.model_cfg.system_prompt)
        self.perception = PerceptionPass(self.processor, rl)  # PAPO / VPPO (rl.perception); inert when off
        # The micro-batches are ours (token budget): DeepSpeed's accumulation boundary is set per call.
        config = deepspeed_config(rl.zero_stage, 1, 1, rl.grad_clip, rl.lr, rl.weight_decay, self.model_cfg.dtype)
        model = self._load(config)
        if rl.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if rl.freeze_vision:
            model.model.visual.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
        if rl.kl_coef > 0:
            reference = self._load(config).eval().requires_grad_(False)
            if rl.zero_stage == 3:  # partitioned like the policy, no optimizer
                ref_config = {k: v for k, v in config.items() if k != "optimizer"}
                self.reference, _, _, _ = deepspeed.initialize(model=reference, config=ref_config)
            else:
                self.reference = reference.to(self.engine.device)
        from avar_ray.ray_utils import where_am_i

        return {**where_am_i(), "rank": self.rank, "setup_s": time.perf_counter() - start,
                "trainable": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)}

    def _logprobs(self, model, encoded, items, with_entropy: bool = False, **kwargs):
        return forward_logprobs(model, encoded, [len(it.response_ids) for it in items], self.rl.temperature,
                                self.banned, with_entropy, **kwargs)

    # ------------------------------------------------------------------ the no-grad pass
    def _prompt_error(self, prompt, item: TrainItem) -> str:
        """Non-empty when the learner's prompt ids differ from vLLM's (the rollout gets reward 0)."""
        ids = prompt.ids
        if not item.prompt_ids or ids == list(item.prompt_ids):
            return ""
        error = (f"sample {prompt.sample_id}: the learner's prompt ({len(ids)} tokens) differs from "
                 f"vLLM's ({len(item.prompt_ids)} tokens)")
        log.warning("learner %d: %s", self.rank, error)
        return error

    @torch.no_grad()
    def score(self, micro_batches: list[list[tuple[int, TrainItem, bool]]],
              checks: list[tuple[int, TrainItem]] = (), with_old: bool = True, step: int = 0) -> dict:
        """r_visual (ungated) of the rows flagged True, their old log-probs (``with_old``), masked-image
        log-probs (``rl.perception``, masks seeded by ``step``) and the prompt-id check against vLLM.
        ``micro_batches``: (step index, item, wants statistics) to forward; ``checks``: (step
        index, item) whose prompts are only encoded (cached for the update) and checked."""
        from avar_ray.attention import AttentionContext
        from rewards import visual_ratio

        self.engine.eval()
        out: dict[int, ScoredPass] = {}
        seconds = {"forward": 0.0}
        for micro in micro_batches:
            items = [it for _, it, _ in micro]
            encoded, prompts = self.prompts.encode(items)  # on the host: forward_logprobs moves it
            ctx = None
            if any(want for _, _, want in micro):
                num_layers = self.engine.module.config.get_text_config().num_hidden_layers
                ctx = AttentionContext.from_spans(encoded.spans.to(self.engine.device), query="response",
                                                  layers=self.attention.layers, chunk_size=self.attention.chunk_size,
                                                  num_layers=num_layers)
                ctx.query_mask &= torch.tensor([want for _, _, want in micro], device=ctx.query_mask.device)[:, None]
            t = time.perf_counter()
            kwargs = {"avar_context": ctx} if ctx is not None else {}
            logprob, _, _ = self._logprobs(self.engine, encoded, items, **kwargs)
            masked = self.perception.score_logprobs(self, prompts, items, step)
            seconds["forward"] += time.perf_counter() - t
            stats = ctx.stats() if ctx is not None else None
            for b, ((index, item, want), prompt) in enumerate(zip(micro, prompts)):
                vas = math.nan
                if want:
                    mass_v, mass_s = stats.sample(b)
                    vas = visual_ratio(mass_v, mass_s, eps=self.attention.eps)
                old = logprob[b, :len(item.response_ids)].tolist() if with_old else None
                out[index] = ScoredPass(old, vas, self._prompt_error(prompt, item), masked and masked[b])
        for (index, item), prompt in zip(checks, self.prompts.prompts([it.sample for _, it in checks])):
            out[index] = ScoredPass(None, math.nan, self._prompt_error(prompt, item))
        return {"passes": out, "seconds": seconds}

    # ------------------------------------------------------------------ training
    def train(self, minis: list[list[list[TrainItem]]], infos: list[dict], step: int = 0) -> dict:
        """``rl.ppo_epochs`` passes over ``minis`` (mini-batch -> micro-batches of items), one
        optimizer step per mini-batch; ``infos``: verl's global batch info per mini-batch. Items
        without old log-probs (one optimizer step in all: ``LearnerGroup.old_from_train``) take
        this forward's own, detached: the policy before the step, as a separate no-grad pass
        would compute them (TRL at ``num_iterations=1``, verl); their vLLM-vs-learner log-prob
        difference is measured here then.

        The sums stay tensors on the device until the end: a ``float()`` per micro-batch would
        make the host wait for the GPU's backward before it builds the next micro-batch.
        ``rl.perception`` (``actors.perception``): PAPO's loss terms, VPPO's token weights."""
        from avar_ray.grpo import kl_loss, policy_loss, tis_weights

        rl, engine = self.rl, self.engine
        engine.train()
        stats = {"pg_loss": 0.0, "kl_loss": 0.0, "entropy_sum": 0.0, "tokens": 0, "clipfrac_sum": 0.0,
                 "ppo_kl_sum": 0.0, "update_tokens": 0, "tis_sum": 0.0, "tis_capped": 0, "updates": 0,
                 "diff_max": torch.zeros((), device=engine.device), "diff_sum": 0.0, "diff_tokens": 0}
        grad_norm = math.nan
        for epoch in range(rl.ppo_epochs):
            for m, mini in enumerate(minis):
                for k, items in enumerate(mini):
                    engine.set_gradient_accumulation_boundary(k == len(mini) - 1)
                    encoded, prompts = self.prompts.encode(items)  # from the step's cached prompts
                    logprob, entropy, mask = self._logprobs(engine, encoded, items, with_entropy=epoch == 0)
                    width, n_tok = logprob.shape[1], sum(len(it.response_ids) for it in items)  # = mask.sum()
                    rollout = pad_rows([it.rollout_logprobs for it in items], width).to(logprob.device)
                    if items[0].old_logprobs is None:  # on-policy at the only optimizer step
                        old = logprob.detach()
                        diff = torch.where(mask.bool(), (old - rollout).abs(), 0.0)
                        stats["diff_max"] = torch.maximum(stats["diff_max"], diff.max())
                        stats["diff_sum"] += diff.sum()
                        stats["diff_tokens"] += n_tok
                    else:
                        old = pad_rows([it.old_logprobs for it in items], width).to(logprob.device)
                    tis = tis_weights(old, rollout, rl.tis_cap)
                    weights = self.perception.token_weights(items, tis, width, logprob.device)  # VPPO's top-k
                    advantages = torch.tensor([it.advantage for it in items], dtype=torch.float32, device=logprob.device)
                    pg_loss, metrics = policy_loss(old, logprob, advantages, mask, rl.clip_ratio, rl.n_samples,
                                                   infos[m], rl.loss_agg_mode, weights)
                    loss = pg_loss + self.perception.update_terms(self, logprob, mask, items, prompts, step, infos[m],
                                                                  record=epoch == 0)
                    if self.reference is not None:
                        with torch.no_grad():
                            ref = self._logprobs(self.reference, encoded, items)[0]
                        kl = kl_loss(logprob, ref, mask, rl.kl_type, infos[m], rl.loss_agg_mode)
                        loss = loss + rl.kl_coef * kl
                        stats["kl_loss"] += kl.detach() if epoch == 0 else 0.0
                    engine.backward(loss, scale_wrt_gas=False)  # already scaled by the global token count
                    stats["clipfrac_sum"] += metrics["actor/pg_clipfrac"] * n_tok
                    stats["ppo_kl_sum"] += metrics["actor/ppo_kl"] * n_tok
                    stats["update_tokens"] += n_tok
                    if tis is not None:
                        stats["tis_sum"] += (tis * mask).sum()
                        stats["tis_capped"] += ((tis >= rl.tis_cap) & mask).sum()
                    if epoch == 0:
                        stats["pg_loss"] += pg_loss.detach()
                        stats["tokens"] += n_tok
                        stats["entropy_sum"] += (entropy * mask).sum()
                engine.step()
                stats["updates"] += 1
                norm = engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else math.nan
        stats.update(self.perception.end_step())
        stats = {k: v.item() if torch.is_tensor(v) else v for k, v in stats.items()}  # the one sync
        stats["pg_loss"] /= len(minis)
        stats["kl_loss"] /= len(minis)
        stats["grad_norm"] = grad_norm
        # the step's last use of its prompts: the next step starts with an empty cache
        cache = self.prompts.clear()
        stats["prompt_encodes"], stats["prompt_encode_s"] = cache["encodes"], cache["seconds"]
        return stats

    @torch.no_grad()
    def logprobs(self, items: list[TrainItem]) -> list[list[float]]:
        """Current-policy log-probs of the given responses (tests, diagnostics; one rank)."""
        self.engine.eval()
        encoded = PromptCache(self.processor, self.model_cfg.system_prompt).encode(items)[0]  # not the step's
        lp, _, _ = self._logprobs(self.engine, encoded, items)
        return [lp[i, :len(it.response_ids)].tolist() for i, it in enumerate(items)]

    # ------------------------------------------------------------------ weights
    def _synced(self) -> list:
        """The parameters a weight sync carries: all, or with ``rl.freeze_vision`` only the
        trainable ones (the frozen vision tower never changes)."""
        named = self.engine.module.named_parameters()
        return list(trainable_only(named) if self.rl.freeze_vision else named)

    def _full_parameters(self, bucket_bytes: int):
        """(name, full tensor) on rank 0, (name, None) elsewhere; ZeRO-3 gathers bucket-wise
        on every rank (a collective), so all ranks must iterate."""
        import deepspeed

        named = self._synced()
        if self.rl.zero_stage != 3:
            for name, p in named:
                yield name, (p.detach() if self.rank == 0 else None)
            return
        lookup = dict(named)
        sizes = [(n, p.ds_numel * p.element_size()) for n, p in named]
        for group in bucket_names(sizes, bucket_bytes):
            params = [lookup[n] for n in group]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                for n, p in zip(group, params):
                    yield n, (p.detach().clone() if self.rank == 0 else None)

    def publish_weights(self, version: int, bucket_mb: float) -> Optional[WeightHandle]:
        """Every rank calls this; rank 0 returns the handle of the object-store buckets."""
        named = self._full_parameters(int(bucket_mb * MIB))
        if self.rank != 0:
            for _ in named:
                pass
            return None
        return publish_object_store(named, version, bucket_mb)

    # ---- broadcast backend (nccl on GPU, gloo on CPU): the sender side of weight_sync.WeightSync
    def init_weight_group(self, host: str, port: int, world_size: int, backend: str,
                          timeout_s: Optional[float] = None) -> None:
        """Rank 0 joins the weight-broadcast group as its source (rank 0 of that group); a
        previous group (rebuilt after a receiver restarted) is dropped first."""
        if self.rank == 0:
            self._weight_group = None
            self._weight_group = make_weight_group(host, port, 0, world_size, backend, timeout_s)
            self._weight_backend = backend

    def weight_table(self, version: int, bucket_mb: float) -> WeightHandle:
        """Names, full shapes and dtypes per bucket (ZeRO-3: ``ds_shape``, no gather needed)."""
        entries = ((n, getattr(p, "ds_shape", p.shape), p.dtype) for n, p in self._synced())
        return broadcast_table(entries, int(bucket_mb * MIB), version, self._weight_backend)

    def broadcast_weights(self, handle: WeightHandle) -> float:
        """Every rank calls this (ZeRO-3 gathers are collectives); rank 0 broadcasts each bucket
        of ``handle``'s table as soon as its tensors are gathered. Returns seconds."""
        start = time.perf_counter()
        named = self._full_parameters(handle.bucket_bytes)
        if self.rank == 0:
            try:
                send_broadcast(self._weight_group, named, handle, self.engine.device)
            except Exception:
                # A receiver died mid-broadcast: leave the group (its sockets close, so receivers
                # still waiting on rank 0 fail at once) and finish the walk (the other ranks'
                # gathers are collectives); the driver rebuilds the group and redoes the sync.
                self._weight_group = None
                for _ in named:
                    pass
                raise
        else:
            for _ in named:  # the gathers are collectives: every rank walks them
                pass
        return time.perf_counter() - start

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        # Under one key: DeepSpeed hands back every unconsumed key of its own state beside ours.
        # save_latest off: avar_ray.rl.checkpoint points ``latest`` at a checkpoint once it is whole
        self.engine.save_checkpoint(directory, tag=tag, client_state={CLIENT_STATE_KEY: dict(client_state)},
                                    save_latest=False)

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        """Weights, optimizer and scheduler state of ``tag``; returns the ``client_state`` given
        to ``save_checkpoint``, exactly."""
        if not (Path(directory) / tag).is_dir():  # DeepSpeed itself fails with a bare assert
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag!r} under {directory}")
        if not client_state or CLIENT_STATE_KEY not in client_state:
            raise KeyError(f"DeepSpeed checkpoint {tag!r} under {directory} has no avar client state "
                           f"({CLIENT_STATE_KEY!r}): not written by this learner")
        return client_state[CLIENT_STATE_KEY]

    def export_hf(self, directory: str) -> None:
        """An HF checkpoint (transformers- and vLLM-loadable) of the current policy: every rank
        calls it (the ZeRO-3 gather is a collective), rank 0 writes (``modeling.export_hf``)."""
        from avar_ray.modeling import export_hf

        export_hf(self.engine, self.processor, directory, self.rl.zero_stage, self.rank)
