"""The LM head under ZeRO-3 (issue 24, item 2): two gloo ranks, DeepSpeed ZeRO-3, a small
decoder whose head is the largest parameter. ``actors.policy.hidden_logprobs`` over several
LM-head chunks gathers the head's weight at most twice per micro-batch (once for the forward,
once for the backward), and its log-probs and gradients equal a plain full-softmax reference
on the same weights (every rank's data; DeepSpeed averages the gradients over the ranks)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

VOCAB, HIDDEN, INPUT_VOCAB = 1024, 32, 64  # head 32k numel > every other parameter together
BATCH, LENGTH, RESPONSE = 2, 320, 300  # 600 response tokens: 5 chunks of 128


class Decoder(torch.nn.Module):
    """Embedding -> linear -> tanh: the hidden states; ``lm_head`` is applied by the caller (as
    ``actors.policy.hidden_only`` makes an HF model's forward return hidden states)."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB if tied else INPUT_VOCAB, HIDDEN)
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        if tied:  # as Qwen2.5-VL-3B's (tie_word_embeddings)
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return torch.tanh(self.proj(self.embed(ids)))


def _reference(tied: bool, weights: dict, ids, targets, positions, mask, temperature, banned):
    """Plain autograd on the whole ``[N, V]`` logits: log-probs and the gradients of their sum."""
    model = Decoder(tied)
    model.load_state_dict(weights, strict=not tied)  # tied: the head is embed.weight
    hidden = model(ids)
    rows = torch.arange(BATCH).unsqueeze(1).expand_as(mask)[mask]
    cols = positions[mask]
    logits = model.lm_head(hidden[rows, cols - 1]).float() / temperature
    logits[:, banned] = -float("inf")
    lp = torch.log_softmax(logits, -1).gather(-1, targets[rows, cols].unsqueeze(-1)).squeeze(-1)
    lp.sum().backward()
    return lp.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = {tied: _check(rank, tied) for tied in (False, True)}  # one process start for both
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _check(rank: int, tied: bool) -> dict:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from actors.policy import LOGPROB_CHUNK, hidden_logprobs, response_index

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_prefetch_bucket_size": 0}}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = Decoder(tied)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    head = engine.module.lm_head
    assert head.weight.ds_numel == VOCAB * HIDDEN and head.weight.numel() == 0  # partitioned
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}

    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    ids = torch.randint(0, INPUT_VOCAB, (BATCH, LENGTH), generator=gen)
    banned, temperature = [3, 5, 900], 0.7
    targets = torch.randint(0, VOCAB - 200, (BATCH, LENGTH), generator=gen) + 10  # none banned
    positions, mask = response_index([LENGTH - RESPONSE, LENGTH - RESPONSE + 7], [RESPONSE, RESPONSE - 7])

    gathers = []
    backend = deepspeed.comm.comm.cdb  # every DeepSpeed collective goes through it
    originals = {name: getattr(backend, name) for name in ("all_gather_into_tensor", "all_gather")}

    def counting(name):
        def call(*args, **kwargs):
            output = kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None))
            size = sum(t.numel() for t in output) if isinstance(output, list) else output.numel()
            if size >= VOCAB * HIDDEN:  # only a gather that holds the head is this large
                gathers.append(size)
            return originals[name](*args, **kwargs)
        return call

    hidden = engine(ids)
    for name in originals:
        setattr(backend, name, counting(name))
    try:
        lp, _ = hidden_logprobs(head, hidden, targets, positions, mask, temperature, banned)
        forward_gathers = len(gathers)
        engine.backward((lp * mask).sum())
    finally:
        for name in originals:
            delattr(backend, name)  # the class's methods again
    ref_lp, ref_grads = _reference(tied, weights, ids, targets, positions, mask, temperature, banned)
    grads = {}
    for name, p in engine.module.named_parameters():
        grads[name] = safe_get_full_grad(p)
        dist.all_reduce(ref_grads[name])  # DeepSpeed's gradient: the mean over the ranks
        ref_grads[name] /= 2
    return {"forward_gathers": forward_gathers, "gathers": len(gathers),
              "chunks": -(-int(mask.sum()) // LOGPROB_CHUNK),
              "lp_err": float((lp.detach()[mask] - ref_lp).abs().max()),
              "grad_err": {n: float((grads[n] - ref_grads[n]).abs().max()) for n in grads},
              "grad_scale": {n: float(ref_grads[n].abs().max()) for n in grads}}


@pytest.mark.slow
def test_zero3_head_is_gathered_once_per_pass_with_equal_logprobs_and_gradients(tmp_path):
    """Untied, and tied to the input embedding as Qwen2.5-VL-3B's (the embedding's backward
    then uses the weight this backward gathered)."""
    import subprocess
    import sys

    from avar_ray.ray_utils import free_port

    # KNOWN FLAKE, not understood yet: in the full suite (2 cores under load) a rank has aborted
    # once in a few runs with "terminate called without an active exception" (a C++ thread torn
    # down; alone the test passed 6 of 6). A rank that aborts is retried once, in a fresh
    # interpreter; wrong log-probs, gradients or gather counts are never retried.
    for attempt in range(2):
        launch = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                  "import torch.multiprocessing as mp; import test_head_gather as t; "
                  f"mp.spawn(t._rank, args=({free_port('127.0.0.1')}, {str(tmp_path)!r}), nprocs=2, join=True)")
        run = subprocess.run([sys.executable, "-c", launch], capture_output=True, text=True, timeout=600)
        if run.returncode == 0 or "terminate called without an active exception" not in run.stderr:
            break
        print(f"attempt {attempt}: a rank aborted; retrying once:\n{run.stderr[-2000:]}")
    assert run.returncode == 0, run.stderr[-4000:]
    results = [r for rank in range(2) for r in json.loads((tmp_path / f"rank{rank}.json").read_text()).values()]
    assert len(results) == 4
    for result in results:
        assert result["chunks"] >= 4  # per-chunk head calls would have gathered it 3 x 4 times
        assert result["forward_gathers"] == 1 and result["gathers"] == 2, result
        assert result["lp_err"] < 1e-5, result
        for name, err in result["grad_err"].items():
            assert result["grad_scale"][name] > 0 and err <= 1e-5 * max(1.0, result["grad_scale"][name]), (name, result)
