"""The learner group: N Ray actors in one placement group forming a torch.distributed group
(gloo on CPU, nccl on GPU), each running ``deepspeed.initialize`` (ZeRO stage from the config).

Per step each rank gets an equal share of the rollouts and runs the GRPO update with verl's
``core_algos`` (``avar_ray.rl.grpo``): old log-probs, clipped token-mean policy loss, optional
KL to a frozen reference, gradient clipping, one optimizer step per PPO epoch. Rank 0 gathers
the full weights (ZeRO-3: per bucket) and publishes them for the weight sync.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from actors.policy import banned_token_ids, encode_rollouts, forward_logprobs, pad_rows
from actors.records import TrainItem
from actors.weight_sync import (MIB, WeightHandle, broadcast_bucket, broadcast_table, bucket_names, make_weight_group,
                                publish_object_store)
from avar_ray.ray_utils import free_port

CLIENT_STATE_KEY = "avar_client_state"

@dataclass
class LearnerSpec:
    model_path: str
    dtype: str = "float32"
    zero_stage: int = 2
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    share_size: int = 4  # rollouts per rank per step (fixed: DeepSpeed's accumulation count)
    ppo_epochs: int = 1
    clip_ratio: float = 0.2
    rollout_n: int = 4
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    loss_agg_mode: str = "token-mean"
    temperature: float = 1.0
    system_prompt: Optional[str] = None
    seed: int = 0
    use_gpu: bool = False

    @property
    def micro_batches(self) -> int:
        return math.ceil(self.share_size / self.micro_batch_size)


def deepspeed_config(spec: LearnerSpec) -> dict:
    return {
        "train_micro_batch_size_per_gpu": min(spec.micro_batch_size, spec.share_size),
        "gradient_accumulation_steps": spec.micro_batches,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": spec.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        # torch's AdamW: DeepSpeed's CPU Adam would JIT-compile first (~53 s, ARCHITECTURE.md)
        "optimizer": {"type": "AdamW", "params": {"lr": spec.lr, "weight_decay": spec.weight_decay,
                                                  "torch_adam": True}},
        "bf16": {"enabled": spec.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,
    }



class Learner:
    """One rank of the learner group."""

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.engine = None

    def address(self) -> tuple[str, int, str]:
        import ray

        return ray.util.get_node_ip_address(), free_port(""), ray.get_runtime_context().get_node_id()

    def setup(self, master_addr: str, master_port: int, local_rank: int, local_world_size: int) -> dict:
        import deepspeed

        from avar_ray.modeling import load_model, load_processor

        start = time.perf_counter()
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port),
                          # a GPU actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES)
                          LOCAL_RANK=str(0 if self.spec.use_gpu else local_rank),
                          LOCAL_WORLD_SIZE=str(1 if self.spec.use_gpu else local_world_size))
        torch.manual_seed(self.spec.seed)
        deepspeed.init_distributed(dist_backend="nccl" if self.spec.use_gpu else "gloo", auto_mpi_discovery=False)
        self.processor = load_processor(self.spec.model_path)
        self.banned = banned_token_ids(self.processor)
        model = load_model(self.spec.model_path, dtype=self.spec.dtype, attn_implementation="sdpa")
        self.reference = None
        if self.spec.kl_coef > 0:
            self.reference = load_model(self.spec.model_path, dtype=self.spec.dtype, attn_implementation="sdpa").eval()
            self.reference.requires_grad_(False)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                    config=deepspeed_config(self.spec))
        if self.reference is not None:
            self.reference.to(self.engine.device)
        return {"rank": self.rank, "pid": os.getpid(), "setup_s": time.perf_counter() - start}

    # ------------------------------------------------------------------ training
    def _micro_batches(self, items: list[TrainItem]):
        size = self.spec.micro_batch_size
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            encoded = encode_rollouts(self.processor, [it.sample for it in chunk], [it.response_ids for it in chunk],
                                      self.spec.system_prompt)
            yield chunk, encoded, [len(it.response_ids) for it in chunk]

    def _logprobs(self, model, encoded, lengths, with_entropy=False):
        return forward_logprobs(model, encoded, lengths, self.spec.temperature, self.banned, with_entropy)

    def train_step(self, items: list[TrainItem], info: dict) -> dict:
        """The GRPO update on this rank's share. ``info``: verl's global batch info (dp_size,
        batch_num_tokens, global_batch_size) so that the loss is the mean over the whole batch."""
        from avar_ray.rl.grpo import kl_loss, policy_loss

        if len(items) != self.spec.share_size:
            raise ValueError(f"learner {self.rank}: got {len(items)} rollouts, expected a share of {self.spec.share_size}")
        spec, engine = self.spec, self.engine
        engine.train()
        batches = list(self._micro_batches(items))
        stats = {"pg_loss": 0.0, "kl_loss": 0.0, "entropy_sum": 0.0, "tokens": 0, "clipfrac_sum": 0.0,
                 "ppo_kl_sum": 0.0, "lp_diff_max": 0.0, "lp_diff_sum": 0.0, "old_logprob_s": 0.0}
        old = None
        if spec.ppo_epochs > 1:  # the policy moves between epochs: old log-probs need their own pass
            t = time.perf_counter()
            with torch.no_grad():
                old = [self._logprobs(engine, enc, lengths)[0] for _, enc, lengths in batches]
            stats["old_logprob_s"] = time.perf_counter() - t
        grad_norms = []
        for epoch in range(spec.ppo_epochs):
            for b, (chunk, encoded, lengths) in enumerate(batches):
                logprob, entropy, mask = self._logprobs(engine, encoded, lengths, with_entropy=True)
                # One PPO epoch: nothing changed since sampling, so old == current (detached).
                old_logprob = old[b] if old is not None else logprob.detach()
                advantages = torch.tensor([it.advantage for it in chunk], dtype=torch.float32, device=logprob.device)
                pg_loss, metrics = policy_loss(old_logprob, logprob, advantages, mask, spec.clip_ratio,
                                               spec.rollout_n, info, spec.loss_agg_mode)
                loss = pg_loss
                if self.reference is not None:
                    with torch.no_grad():
                        ref_logprob = self._logprobs(self.reference, encoded, lengths)[0]
                    kl = kl_loss(logprob, ref_logprob, mask, spec.kl_type, info, spec.loss_agg_mode)
                    loss = loss + spec.kl_coef * kl
                    stats["kl_loss"] += float(kl) if epoch == 0 else 0.0
                engine.backward(loss, scale_wrt_gas=False)  # already scaled by the global token count
                engine.step()
                if epoch == 0:
                    n_tok = int(mask.sum())
                    stats["pg_loss"] += float(pg_loss.detach())
                    stats["tokens"] += n_tok
                    stats["entropy_sum"] += float((entropy.detach() * mask).sum())
                    stats["clipfrac_sum"] += metrics["actor/pg_clipfrac"] * n_tok
                    stats["ppo_kl_sum"] += metrics["actor/ppo_kl"] * n_tok
                    rollout_lp = pad_rows([it.rollout_logprobs for it in chunk], logprob.shape[1]).to(logprob.device)
                    diff = (logprob.detach() - rollout_lp).abs() * mask
                    stats["lp_diff_max"] = max(stats["lp_diff_max"], float(diff.max()))
                    stats["lp_diff_sum"] += float(diff.sum())
            norm = engine.get_global_grad_norm()
            grad_norms.append(float(norm) if norm is not None else math.nan)
        stats["grad_norm"] = grad_norms[-1]
        return stats

    @torch.no_grad()
    def logprobs(self, items: list[TrainItem]) -> list[list[float]]:
        """Current-policy log-probs of the given responses (tests, diagnostics)."""
        self.engine.eval()
        out = []
        for chunk, encoded, lengths in self._micro_batches(items):
            lp, _, _ = self._logprobs(self.engine, encoded, lengths)
            out.extend(lp[i, :n].tolist() for i, n in enumerate(lengths))
        return out

    # ------------------------------------------------------------------ weights
    def _full_parameters(self, bucket_bytes: int):
        """(name, full tensor) on rank 0, (name, None) elsewhere; ZeRO-3 gathers bucket-wise
        on every rank (a collective), so all ranks must iterate."""
        import deepspeed

        named = list(self.engine.module.named_parameters())
        if self.spec.zero_stage != 3:
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

    # ---- broadcast backend (nccl on GPU, gloo on CPU): see weight_sync.BroadcastWeightSync
    def init_weight_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the weight-broadcast group as its source (rank 0 of that group)."""
        if self.rank == 0:
            self._weight_group = make_weight_group(host, port, 0, world_size, backend)
            self._weight_backend = backend

    def weight_table(self, version: int, bucket_mb: float) -> WeightHandle:
        """Names, full shapes and dtypes per bucket (ZeRO-3: ``ds_shape``, no gather needed)."""
        entries = ((n, getattr(p, "ds_shape", p.shape), p.dtype) for n, p in self.engine.module.named_parameters())
        return broadcast_table(entries, int(bucket_mb * MIB), version, self._weight_backend)

    def broadcast_weights(self, handle: WeightHandle) -> float:
        """Every rank calls this (ZeRO-3 gathers are collectives); rank 0 broadcasts each bucket
        of ``handle``'s table as soon as its tensors are gathered. Returns seconds."""
        start = time.perf_counter()
        bucket, pending = 0, []
        for name, tensor in self._full_parameters(handle.bucket_bytes):
            if self.rank != 0:
                continue
            expected = handle.names[bucket][len(pending)]
            if name != expected:
                raise RuntimeError(f"weight broadcast: parameter {name!r} where the table has {expected!r}")
            pending.append(tensor)
            if len(pending) == len(handle.names[bucket]):
                broadcast_bucket(self._weight_group, pending, handle.shapes[bucket], self.engine.device)
                bucket, pending = bucket + 1, []
        return time.perf_counter() - start

    def publish_per_tensor(self) -> list:
        """Baseline for the bench: one object per parameter (rank 0, ZeRO-1/2)."""
        from actors.weight_sync import pack_bucket
        import ray

        return [ray.put(pack_bucket({n: p})) for n, p in self.engine.module.named_parameters()]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        # Under one key: DeepSpeed hands back every unconsumed key of its own state beside ours.
        self.engine.save_checkpoint(directory, tag=tag, client_state={CLIENT_STATE_KEY: dict(client_state)})

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
        """An HF checkpoint (transformers- and vLLM-loadable) of the current policy."""
        state = None
        if self.spec.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank
        if self.rank != 0:
            return
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.engine.module.save_pretrained(out, state_dict=state)
        self.processor.save_pretrained(out)


class LearnerGroup:
    """The driver's view of the learners: equal shares in, summed metrics out."""

    def __init__(self, spec: LearnerSpec, placement):
        import ray

        from actors.placement import learner_options, learner_placement_group

        self.spec = spec
        self.world_size = placement.learners
        self.pg = learner_placement_group(placement)
        cls = ray.remote(Learner)
        self.actors = [cls.options(**learner_options(placement, self.pg, r)).remote(spec, r, self.world_size)
                       for r in range(self.world_size)]
        addresses = ray.get([a.address.remote() for a in self.actors])
        master_addr, master_port, _ = addresses[0]
        nodes = [node for _, _, node in addresses]
        local = [nodes[:r].count(nodes[r]) for r in range(self.world_size)]
        self.info = ray.get([a.setup.remote(master_addr, master_port, local[r], nodes.count(nodes[r]))
                             for r, a in enumerate(self.actors)])

    def train_step(self, items: list[TrainItem]) -> dict:
        import ray

        from actors.rollout import split_even
        from avar_ray.rl.grpo import batch_info

        shares = split_even(items, self.world_size)
        tokens = sum(len(it.response_ids) for it in items)
        info = batch_info(self.world_size, tokens, len(items))
        per_rank = ray.get([a.train_step.remote(s, info) for a, s in zip(self.actors, shares)])
        n_tok = max(sum(r["tokens"] for r in per_rank), 1)
        # Each rank's loss is its token sum / global tokens * dp_size: summed over ranks / dp_size.
        return {
            "actor/pg_loss": sum(r["pg_loss"] for r in per_rank) / self.world_size,
            "actor/kl_loss": sum(r["kl_loss"] for r in per_rank) / self.world_size,
            "actor/entropy": sum(r["entropy_sum"] for r in per_rank) / n_tok,
            "actor/pg_clipfrac": sum(r["clipfrac_sum"] for r in per_rank) / n_tok,
            "actor/ppo_kl": sum(r["ppo_kl_sum"] for r in per_rank) / n_tok,
            "actor/grad_norm": per_rank[0]["grad_norm"],
            "actor/logprob_diff_max": max(r["lp_diff_max"] for r in per_rank),
            "actor/logprob_diff_mean": sum(r["lp_diff_sum"] for r in per_rank) / n_tok,
            "time/old_logprob": max(r["old_logprob_s"] for r in per_rank),
        }

    def publish_weights(self, version: int, bucket_mb: float) -> WeightHandle:
        import ray

        return ray.get([a.publish_weights.remote(version, bucket_mb) for a in self.actors])[0]

    def logprobs(self, items: list[TrainItem]) -> list[list[float]]:
        import ray

        return ray.get(self.actors[0].logprobs.remote(items))

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        import ray

        ray.get([a.save_checkpoint.remote(directory, tag, client_state) for a in self.actors])

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        import ray

        return ray.get([a.load_checkpoint.remote(directory, tag) for a in self.actors])[0]

    def export_hf(self, directory: str) -> None:
        import ray

        ray.get([a.export_hf.remote(directory) for a in self.actors])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        remove_placement_group(self.pg)
