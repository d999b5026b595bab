#!/usr/bin/env bash
# What the CPU suite cannot check, on a machine with one (or more) CUDA GPU, in under 8 minutes;
# prints one table at the end.
#
#   bash bench/gpu_check.sh            # on the GPU machine (a venv with CUDA torch + vllm: make install EXTRA=gpu)
#   bash bench/gpu_check.sh --dry-run  # here, on CPU: every piece that can run without a GPU, at small sizes
#
# 1 weight-sync  tests/test_weight_sync.py::test_broadcast_into_vllm_on_cuda: the persistent broadcast group
#                into a vLLM engine on CUDA, two syncs, vLLM log-probs == the sender's. nccl with >= 2 GPUs;
#                on ONE GPU NCCL refuses two ranks on one device ("Duplicate GPU detected"), so the group
#                runs gloo over the CUDA tensors (the table says which).
# 2 vllm-parity  tests/test_rl_actors.py -k gpu: vLLM on CUDA generating, reloading from the DeepSpeed
#                learner and matching its log-probs (the RL colleague's test; skipped if absent).
# 3 attention    statistics pass in bf16 vs float32 on a Qwen2.5-VL-3B-shaped model (2 text layers at real
#                widths: hidden 2048, 16 heads, 2 KV heads, MLP 11008, vocab 151936), T=4096, Q = R: max
#                relative error of the V/S masses (methods fused = old, lse = new), and each method's time and
#                peak memory over a plain SDPA forward, without and with grad (LM + AGTO loss backward).
# 4 grpo-zero3   `avar rl` on the tiny model, 2 GRPO steps, ZeRO-3, learner and vLLM sharing the GPU
#                (weight sync over nccl with >= 2 GPUs, else the object store).
# 5 learner      bench/gpu_learner.py learner: one learner rank (DeepSpeed ZeRO-3, bf16) in-process: score-pass
#                log-probs and r_visual vs float32, three GRPO updates move the log-probs the advantages' way,
#                the bucket-wise ZeRO-3 gather (the weight-sync payload) reproduces the trained policy.
# 6 broadcast    bench/gpu_learner.py broadcast: weight_sync's bucketed broadcast between two processes on
#                the GPU (a 3B-wide layer + embedding, ~0.9 GiB), bit-exact, GiB/s next to the copy rates.
# Pieces 1, 2 and 4 need Ray and vLLM; on an image without them they report "skip" and 3, 5 and 6 still run
# (5 and 6 need deepspeed and verl importable, e.g. from wheels on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
AVAR=${AVAR:-.venv/bin/avar}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROWS=()
row() { ROWS+=("$(printf '%-13s %-6s %7s  %s' "$1" "$2" "$3" "$4")"); }
timed() { local t0=$SECONDS; "$@" >"$WORK/out.log" 2>&1; local rc=$?; ELAPSED=$((SECONDS - t0)); return $rc; }

if [[ $DRY == 0 ]] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY (use --dry-run on CPU)"; exit 2
fi
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} TOKENIZERS_PARALLELISM=false

STACK=$($PY -c "import ray, vllm" >/dev/null 2>&1 && echo yes || echo no)  # Ray + vLLM importable?

# ---- 1 + 2: pytest pieces (skip themselves without CUDA; a dry run only collects them)
for piece in "weight-sync:tests/test_weight_sync.py::test_broadcast_into_vllm_on_cuda" \
             "vllm-parity:tests/test_rl_actors.py -k gpu"; do
  name=${piece%%:*}; target=${piece#*:}
  if [[ $STACK == no ]]; then row "$name" skip 0 "no Ray + vLLM in this environment"; continue; fi
  if [[ $DRY == 1 ]]; then
    # shellcheck disable=SC2086
    if timed $PY -m pytest -q --collect-only $target; then row "$name" dry "$ELAPSED" "collected: $(grep -c '::' "$WORK/out.log") test(s)"
    else row "$name" FAIL "$ELAPSED" "$(tail -1 "$WORK/out.log")"; fi
    continue
  fi
  # shellcheck disable=SC2086
  timed timeout 240 $PY -m pytest -q -s -x $target
  rc=$?
  detail=$(grep -m1 "GPU weight sync" "$WORK/out.log" || tail -1 "$WORK/out.log")
  if [[ $rc == 0 ]] && grep -q "passed" "$WORK/out.log"; then row "$name" ok "$ELAPSED" "$detail"
  elif [[ $rc == 5 ]] || grep -q "skipped" "$WORK/out.log"; then row "$name" skip "$ELAPSED" "$detail"
  else row "$name" FAIL "$ELAPSED" "$detail"; fi
done

# ---- 3: attention statistics bf16 vs float32 at Qwen2.5-VL-3B widths, old (fused) vs new (lse)
cat >"$WORK/attn.py" <<'PY'
import copy, sys, time
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from avar_ray.attention import AttentionContext, agto_losses, register_attention
from avar_ray.modeling import float32_rope

dry = sys.argv[1] == "1"
device = "cpu" if dry else "cuda"
T = 256 if dry else 4096
text = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
if dry:  # the same code at a width a CPU run can afford
    text.update(hidden_size=256, intermediate_size=512, num_attention_heads=8, vocab_size=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=64, intermediate_size=128,
                          num_heads=2, out_hidden_size=text["hidden_size"]),
                          image_token_id=text["vocab_size"] - 2, video_token_id=text["vocab_size"] - 1,
                          vision_start_token_id=text["vocab_size"] - 4, vision_end_token_id=text["vocab_size"] - 3)
register_attention()
pos = torch.arange(T, device=device)[None]
system, visual = pos < 24, (pos >= 24) & (pos < 24 + T // 4)
response = pos >= T // 2
ids = torch.randint(0, text["vocab_size"] - 8, (1, T), device=device)
labels = torch.where(response, ids, -100)
torch.manual_seed(0)
f32 = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="avar", dtype=torch.float32).to(device).eval()

def sync():
    if device == "cuda": torch.cuda.synchronize()

def run(model, method, grad=False):  # method None: plain SDPA (no context)
    kw = dict(input_ids=ids, use_cache=False, labels=labels if grad else None)
    with torch.set_grad_enabled(grad):
        if method is None:
            out, stats = model(**kw), None
        else:
            ctx = AttentionContext(visual, system, response, method=method, chunk_size=256 if method == "chunked" else None, num_layers=2)
            out = model(**kw, avar_context=ctx)
            stats = ctx.stats()
        if grad:
            agto = None if stats is None else agto_losses(stats)
            (out.loss if agto is None else out.loss + 0.15 * (agto.enh + agto.sup)).backward()
            model.zero_grad(set_to_none=True)
    return None if stats is None else (stats.mass_v.detach().float(), stats.mass_s.detach().float())

def rel_err(a, b):  # max over V and S of max |a - b| / max |b|
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))

ref = run(f32, "chunked")  # the explicit float32 logsumexp
kernel = {m: rel_err(run(f32, m), ref) for m in ("fused", "lse")}
bf16 = copy.deepcopy(f32).to(torch.bfloat16)  # the same weights, rounded
float32_rope(bf16)  # as the learner and SFT do: the cast rounds RoPE's frequencies too
rel = {m: rel_err(run(bf16, m), ref) for m in ("fused", "lse")}
del f32

def peak(fn):  # MiB above what was allocated before the pass (weights excluded)
    if device != "cuda":
        return float("nan")
    sync(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    fn(); sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20

parts = []
for grad in (False, True):
    variants = {"sdpa": None, "fused": "fused", "lse": "lse", "auto": "auto"}
    times = {v: float("inf") for v in variants}
    for v, m in variants.items():
        run(bf16, m, grad)  # warm-up
    mem = {v: peak(lambda: run(bf16, m, grad)) for v, m in variants.items()}
    for _ in range(3):  # interleaved, minimum of 3
        for v, m in variants.items():
            sync(); t0 = time.perf_counter(); run(bf16, m, grad); sync()
            times[v] = min(times[v], time.perf_counter() - t0)
    b = times["sdpa"]
    parts.append(f"{'grad' if grad else 'no grad'}: sdpa {b * 1e3:.1f} ms {mem['sdpa']:.0f} MiB, " + ", ".join(
        f"{v} {times[v] / b:.2f}x {mem[v] / mem['sdpa']:.2f}x mem" for v in ("fused", "lse", "auto")))
print(f"ATTN T={T} bf16: max rel err vs f32 chunked: f32 fused {kernel['fused']:.1e} lse {kernel['lse']:.1e}, "
      f"bf16 fused {rel['fused']:.1e} lse {rel['lse']:.1e}; " + "; ".join(parts))
PY
if timed timeout 300 $PY "$WORK/attn.py" "$DRY"; then row attention "$([[ $DRY == 1 ]] && echo dry || echo ok)" "$ELAPSED" "$(grep -m1 '^ATTN' "$WORK/out.log" | cut -c6-)"
else row attention FAIL "$ELAPSED" "$(tail -1 "$WORK/out.log")"; fi
[[ -n "${GPU_CHECK_LOGS:-}" ]] && cp "$WORK/out.log" "$GPU_CHECK_LOGS/attention.log"

# ---- 4: two GRPO steps with ZeRO-3 on the GPU (learner and vLLM share it). The weight sync is
# the broadcast group with >= 2 GPUs (gloo over CUDA: with fractional GPU shares RLSystem does not
# pick nccl, which refuses a learner rank and an engine rank on the same device).
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
SYNC=$([[ $NGPU -ge 2 ]] && echo broadcast || echo object_store)
RL_ARGS=(rl.steps=2 rl.zero_stage=3 rl.prompts_per_step=2 rl.n_samples=4 rl.max_new_tokens=16 rl.save_every=0
         rl.placement.learner_gpus=0.4 rl.placement.rollout_gpus=0.4 rl.gpu_memory_utilization=0.3
         "rl.weight_sync_backend=$SYNC" "rl.out=$WORK/rl")
if [[ $STACK == no ]]; then
  row grpo-zero3 skip 0 "no Ray + vLLM in this environment"
elif [[ $DRY == 1 ]]; then
  if timed $PY -c "from avar_ray.config import load_config; import sys; load_config('configs/tiny_local.yaml', sys.argv[1:])" "${RL_ARGS[@]}"
  then row grpo-zero3 dry "$ELAPSED" "config with ZeRO-3 + GPU placement validates"
  else row grpo-zero3 FAIL "$ELAPSED" "$(tail -1 "$WORK/out.log")"; fi
else
  $AVAR tiny-model --out "$WORK/tiny" >/dev/null 2>&1 && $AVAR make-data --out "$WORK/data" --n 16 >/dev/null 2>&1
  if timed timeout 300 $AVAR rl -c configs/tiny_local.yaml "model.path=$WORK/tiny" "data.train=$WORK/data/train.parquet" "${RL_ARGS[@]}"
  then row grpo-zero3 ok "$ELAPSED" "sync $SYNC; $(grep -m1 -i 'step 2' "$WORK/out.log" | cut -c1-80)"
  else row grpo-zero3 FAIL "$ELAPSED" "$(tail -1 "$WORK/out.log" | cut -c1-90)"; fi
fi

# ---- 5 + 6: the learner and the broadcast transport, in-process (no Ray cluster, no vLLM)
for piece in learner broadcast; do
  if timed timeout 300 $PY bench/gpu_learner.py $piece $([[ $DRY == 1 ]] && echo --dry-run); then
    row $piece "$([[ $DRY == 1 ]] && echo dry || echo ok)" "$ELAPSED" "$(grep -m1 -E '^(LEARNER|BROADCAST)' "$WORK/out.log" | cut -d' ' -f2-)"
    grep -m1 '^MEMCPY' "$WORK/out.log" >/dev/null && row memcpy ok 0 "$(grep -m1 '^MEMCPY' "$WORK/out.log" | cut -d' ' -f2-)"
  else row $piece FAIL "$ELAPSED" "$(grep -m1 -E '^(LEARNER|BROADCAST)' "$WORK/out.log" || tail -1 "$WORK/out.log")"; fi
  [[ -n "${GPU_CHECK_LOGS:-}" ]] && cp "$WORK/out.log" "$GPU_CHECK_LOGS/$piece.log"
done

echo
echo "gpu_check $([[ $DRY == 1 ]] && echo '(dry run, CPU)') on $($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")')"
printf '%-13s %-6s %7s  %s\n' piece status seconds result
for r in "${ROWS[@]}"; do echo "$r"; done
