"""The driver's side of the learner group (``actors.learner.Learner`` is one rank): the ranks
created in their placement group and set up as one torch.distributed group, the step's rollouts
planned over them by length (``avar_ray.grpo.plan_step`` / ``plan_score``), and their passes and
summed metrics gathered back."""
from __future__ import annotations

from typing import Optional

from actors.learner import Learner
from actors.records import ScoredPass, TrainItem
from actors.weight_sync import WeightHandle


def row_lengths(items: list[TrainItem]) -> list[int]:
    """Prompt + response tokens per rollout (the prompt length from vLLM; image tokens included)."""
    return [len(it.prompt_ids) + len(it.response_ids) for it in items]


class LearnerGroup:
    """The driver's view of the learners: the step's rollouts in, per-rollout passes and summed
    metrics out."""

    def __init__(self, rl, model, attention, pg=None):
        """``pg``: the learners' placement group, already placed (``RLSystem`` creates it before
        any other GPU actor); None: created here."""
        import ray

        from actors.placement import learner_options, learner_placement_group

        self.rl = rl
        placement = rl.placement
        self.world_size = placement.learners
        self.pg = pg if pg is not None else learner_placement_group(placement)
        cls = ray.remote(Learner)
        self.actors = [cls.options(**learner_options(placement, self.pg, r)).remote(rl, model, attention, r,
                                                                                   self.world_size)
                       for r in range(self.world_size)]
        addresses = ray.get([a.address.remote() for a in self.actors])
        master_addr, master_port, _ = addresses[0]
        nodes = [node for _, _, node in addresses]
        local = [nodes[:r].count(nodes[r]) for r in range(self.world_size)]
        self.info = ray.get([a.setup.remote(master_addr, master_port, local[r], nodes.count(nodes[r]))
                             for r, a in enumerate(self.actors)])

    def _plan(self, items: list[TrainItem], mini_batches: int):
        from avar_ray.grpo import plan_step

        return plan_step(row_lengths(items), self.world_size, mini_batches, self.rl.micro_batch_size,
                         self.rl.max_tokens_per_micro_batch)

    @property
    def old_from_train(self) -> bool:
        """One optimizer step per update (``rl.ppo_epochs`` = ``rl.mini_batches`` = 1): it is
        exactly on-policy, so the old log-probs are the train forward's own and the no-grad pass
        runs only where attention statistics are wanted."""
        return self.rl.ppo_epochs == 1 and self.rl.mini_batches == 1

    def score(self, items: list[TrainItem], want_stats: list[bool],
              with_old: Optional[bool] = None, step: int = 0) -> tuple[list[ScoredPass], dict]:
        """The no-grad pass over the step's rollouts, data-parallel (``grpo.plan_score``): one
        ``ScoredPass`` per item (in order) and the pass's metrics. ``with_old``: the old log-probs
        of every rollout too (None: unless ``old_from_train``; else ``old_logprobs`` is None; always
        where ``rl.perception`` masks images here, ``step`` seeding the masks).
        Every rollout's prompt ids are checked against vLLM's."""
        import ray

        from actors.perception import masked_in_score
        from avar_ray.grpo import plan_score

        lengths = row_lengths(items)
        with_old = not self.old_from_train if with_old is None else with_old
        with_old = with_old or masked_in_score(self.rl.perception)  # VPPO's dependency: old vs masked
        forward, check = plan_score(lengths, want_stats, self.world_size, self.rl.micro_batch_size,
                                    self.rl.max_tokens_per_micro_batch, old_from_train=not with_old)
        calls = [a.score.remote([[(i, items[i], want_stats[i]) for i in micro] for micro in forward[r]],
                                [(i, items[i]) for i in check[r]], with_old, step)
                 for r, a in enumerate(self.actors)]
        passes: dict[int, ScoredPass] = {}
        results = ray.get(calls)
        for result in results:
            passes.update(result["passes"])
        ordered = [passes[i] for i in range(len(items))]
        metrics = {
            "learner/prompt_mismatch": sum(1 for p in ordered if p.error),
            "learner/visual_stats_rollouts": sum(want_stats),
            "learner/score_rollouts": sum(len(micro) for rank in forward for micro in rank),
            "time/old_logprob_forward": max(r["seconds"]["forward"] for r in results),
        }
        if with_old:  # else measured by the update's forward (train_step)
            diffs = [abs(a - b) for it, p in zip(items, ordered) for a, b in zip(p.old_logprobs, it.rollout_logprobs)]
            metrics["actor/logprob_diff_max"] = max(diffs, default=0.0)
            metrics["actor/logprob_diff_mean"] = sum(diffs) / max(len(diffs), 1)
        return ordered, metrics

    def train_step(self, items: list[TrainItem], step: int = 0) -> dict:
        """The GRPO update: ``rl.ppo_epochs`` x ``rl.mini_batches`` optimizer steps (with
        ``rl.perception.vppo`` on VPPO-shaped advantages and token masks per mini-batch)."""
        import ray

        from actors.perception import group_metrics, shape_items
        from avar_ray.grpo import batch_info, padding_fraction

        missing = sum(it.old_logprobs is None for it in items)
        if missing and (missing < len(items) or not self.old_from_train):
            raise ValueError(f"train_step: {missing} of {len(items)} rollouts have no old log-probs: with "
                             "rl.ppo_epochs or rl.mini_batches > 1 every rollout needs the score() pass's")
        plan = self._plan(items, self.rl.mini_batches)
        minis = range(self.rl.mini_batches)
        rows_of = [[i for r in range(self.world_size) for micro in plan[r][m] for i in micro] for m in minis]
        items, shaped = shape_items(self.rl.perception, items, rows_of)  # VPPO's, per mini-batch
        infos = []
        for m in minis:
            rows = rows_of[m]
            infos.append(batch_info(self.world_size, sum(len(items[i].response_ids) for i in rows), len(rows)))
        per_rank = ray.get([a.train.remote([[[items[i] for i in micro] for micro in plan[r][m]] for m in minis],
                                           infos, step) for r, a in enumerate(self.actors)])
        n_tok = max(sum(r["tokens"] for r in per_rank), 1)
        n_upd = max(sum(r["update_tokens"] for r in per_rank), 1)
        out = {
            # Each rank's loss is its token sum / global tokens * dp_size: summed over ranks / dp_size.
            "actor/pg_loss": sum(r["pg_loss"] for r in per_rank) / self.world_size,
            "actor/kl_loss": sum(r["kl_loss"] for r in per_rank) / self.world_size,
            "actor/entropy": sum(r["entropy_sum"] for r in per_rank) / n_tok,
            "actor/pg_clipfrac": sum(r["clipfrac_sum"] for r in per_rank) / n_upd,  # over every update
            "actor/ppo_kl": sum(r["ppo_kl_sum"] for r in per_rank) / n_upd,
            "actor/grad_norm": per_rank[0]["grad_norm"],
            "actor/updates": per_rank[0]["updates"],
            # processor calls since the last update (the step's score and train passes), over the
            # ranks: each rank encodes a prompt once however many of its rollouts and passes use it
            "learner/prompt_encodes": sum(r["prompt_encodes"] for r in per_rank),
            "learner/prompt_encode_s": max(r["prompt_encode_s"] for r in per_rank),
            # the update's padded tokens that are padding (like lengths share a micro-batch: grpo.plan_step)
            "learner/padding_fraction": padding_fraction(row_lengths(items),
                                                         [micro for rank in plan for mini in rank for micro in mini]),
        }
        diff_tokens = sum(r["diff_tokens"] for r in per_rank)
        if diff_tokens:  # the old log-probs were the update's own: vLLM's vs them, over its tokens
            out["actor/logprob_diff_max"] = max(r["diff_max"] for r in per_rank)
            out["actor/logprob_diff_mean"] = sum(r["diff_sum"] for r in per_rank) / diff_tokens
        out.update(shaped, **group_metrics(self.rl.perception, per_rank, self.world_size, self.rl.mini_batches))
        if self.rl.tis_cap is not None:
            out["actor/tis_weight_mean"] = sum(r["tis_sum"] for r in per_rank) / n_upd
            out["actor/tis_capped_frac"] = sum(r["tis_capped"] for r in per_rank) / n_upd
        return out

    def publish_weights(self, version: int, bucket_mb: float) -> WeightHandle:
        import ray

        return ray.get([a.publish_weights.remote(version, bucket_mb) for a in self.actors])[0]

    def logprobs(self, items: list[TrainItem]) -> list[list[float]]:
        """Current-policy log-probs (rank 0 alone: ZeRO-1/2 only; ZeRO-3 needs every rank)."""
        import ray

        if self.rl.zero_stage == 3:
            return ray.get([a.logprobs.remote(items) for a in self.actors])[0]
        return ray.get(self.actors[0].logprobs.remote(items))

    def save_checkpoint(self, directory: str, tag: str, client_state: dict, wait: bool = True):
        """Every rank saves; ``wait=False``: returns the calls' refs (``avar_ray.rl.checkpoint.Saver``)."""
        import ray

        refs = [a.save_checkpoint.remote(directory, tag, client_state) for a in self.actors]
        return ray.get(refs) if wait else refs

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        import ray

        return ray.get([a.load_checkpoint.remote(directory, tag) for a in self.actors])[0]

    def export_hf(self, directory: str, wait: bool = True):
        import ray

        refs = [a.export_hf.remote(directory) for a in self.actors]
        return ray.get(refs) if wait else refs

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        remove_placement_group(self.pg)
