"""Typed, validated run configs: YAML files plus dotted command-line overrides.

    cfg = load_config("configs/tiny_local.yaml", ["rl.lr=1e-6", "rl.steps=3"])

Every section is a dataclass; an unknown key or a value of the wrong type fails at load time
with the key's full path (``rl.lr: expected float, got 'fast'``). Defaults live here and
only here: code reads ``cfg.rl.lr``, never ``getattr(cfg, "lr", default)``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from avar_ray.config_cluster import ClusterConfig


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names its path."""


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    path: str = "runs/tiny_model"  # HF directory (transformers + vLLM loadable)
    # The weights' dtype in every stage (vLLM, the RL learners, eval, serve, `avar vas`); bfloat16 and
    # float16 also turn on DeepSpeed's bf16 / fp16 (dynamic loss scale) mixed precision in SFT and RL,
    # where the accelerator has it (else float32, with a warning: DeepSpeed's CPU accelerator lacks fp16).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int = 2048
    # Image resolution, the same in every stage (HF processor and vLLM): |V| and so VAS depend on it.
    # None: the checkpoint's preprocessor config (Qwen2.5-VL-7B: 3,136 .. 12,845,056 pixels).
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    # The system turn of every conversation (synthesis, SFT, RL, eval, serve, `avar vas`).
    # None: the chat template's default (Qwen2.5-VL: "You are a helpful assistant."; Qwen3-VL
    # has none, and VAS = V/S needs one).
    system_prompt: Optional[str] = None


@dataclass
class DataConfig:
    # A file the readers understand (Parquet/JSONL/TSV/MathVista), a folder or glob of Parquet/JSONL
    # shards, or an HF `datasets` directory (save_to_disk), read as one source (also synth.input, data.eval).
    train: str = "runs/data/train.parquet"
    eval: list[str] = field(default_factory=list)
    # Columns of plain rows (EasyR1/verl data: problem, answer, images). `<image>` in the prompt marks
    # where each image stands; images are paths (relative to the data file), bytes or {bytes, path}.
    prompt_key: str = "question"
    answer_key: str = "answer"  # an answer written as \boxed{x} is read as x
    image_key: str = "images"
    n_train: int = 64  # rows `avar make-data` writes when the file is missing
    n_eval: int = 32
    seed: int = 0
    image_size: int = 112
    # Procedural task names drawn in turn (`avar make-data`, the demo); empty: the default mix of
    # six (avar_ray/data/procedural.py TASKS). The demo uses the warm base's tasks.
    tasks: list[str] = field(default_factory=list)


@dataclass
class InterventionConfig:
    """Training-free attention re-weighting (SPEC.md §2): A' ∝ A·(1 + a_img·M_V − a_sys·M_S)."""

    enabled: bool = False
    a_img: float = 0.15
    a_sys: float = 0.4
    # Where the bias is applied: a treatment, not a measurement, so it has its own key (eval can
    # measure VAS over attention.layers while intervening on a subset). None = all text layers.
    layers: Optional[list[int]] = None


@dataclass
class AttentionConfig:
    """The attention-statistics pass of every stage (SFT's AGTO, the RL reward, eval, serve, `avar vas`)."""

    # Text layers every statistic averages over: VAS (eval, serve, `avar vas`), AGTO's losses
    # (SFT) and r_visual (RL); None = all (SPEC.md §1, §4, §5)
    layers: Optional[list[int]] = None
    # None: automatic (avar_ray/attention/kernel.py AUTO: the log-sum-exp method where measured faster,
    # else the fused one-call statistics); N: the chunked method, N query rows x all keys at a time
    # (bounded memory, slower; bench/attention_stats.py)
    chunk_size: Optional[int] = None
    eps: float = 1e-6  # SFT: inside L_sup's log; RL: r_visual's V / (S + eps)


@dataclass
class TeacherConfig:
    kind: Literal["oracle", "vllm", "openai"] = "oracle"
    model: str = ""  # local dir (vllm) or model name (openai)
    base_url: str = ""  # openai-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable; the key never enters configs
    prompt: str = ""  # prompt file ("# version: ..." first line); "" = configs/prompts/<step>.txt
    max_tokens: int = 512
    temperature: float = 0.7
    concurrency: int = 4  # openai: requests in flight per actor
    max_retries: int = 3  # openai: retries on timeouts, connection errors, 429 and 5xx
    timeout_s: float = 60.0  # openai: per request
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # vllm engine dtype
    max_model_len: int = 4096  # vllm engine context
    enforce_eager: Optional[bool] = None  # vllm; None: compiled on GPUs, eager on CPU (engines.start_llm)
    max_images: int = 1  # vllm: images per prompt
    num_cpus: float = 1.0  # per actor of this step's Ray Data stage
    num_gpus: float = 0.0  # per actor: all of its engine's GPUs (vllm: tensor_parallel_size of them)
    tensor_parallel_size: int = 1  # vllm: GPUs one teacher engine spans


@dataclass
class SynthConfig:
    input: str = "runs/data/train.parquet"  # raw samples, any format the data readers understand
    out: str = "runs/synth"
    caption: TeacherConfig = field(default_factory=TeacherConfig)
    reasoning: TeacherConfig = field(default_factory=TeacherConfig)
    anchor: TeacherConfig = field(default_factory=TeacherConfig)
    anchor_positions: list[float] = field(default_factory=lambda: [0.33, 0.66])  # rule-based anchors: 0..1 of the chain
    rows_per_shard: int = 64  # rows handled per committed shard (the most a killed job redoes)
    batch_size: int = 16  # rows per Ray Data batch
    num_actors: int = 1  # actors per teacher stage
    max_rows: int = -1  # pending rows handled this run (-1: all); a rerun picks up the rest


@dataclass
class SFTConfig:
    data: str = "runs/synth"  # synthesis output dir (committed shards), a dir of Parquet files, or one file
    out: str = "runs/sft"
    num_workers: int = 2  # Ray Train workers (one DeepSpeed rank each)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False  # one GPU per worker, NCCL; else CPU with gloo
    zero_stage: int = 2
    epochs: int = 1
    max_steps: int = -1  # -1: run the epochs; else exactly this many optimizer steps
    micro_batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-5
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after a linear warmup
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 1024  # tokens (prompt with images + target); longer rows are skipped and counted
    shuffle: bool = True  # shuffle the rows once (seeded) before splitting them over workers
    freeze_vision: bool = False
    gradient_checkpointing: bool = False  # recompute decoder (and vision) activations in the backward
    alpha: float = 0.15  # L_enh weight (SPEC.md §4)
    beta: float = 0.15  # L_sup weight
    agto_query: Literal["response", "user_visual"] = "response"
    save_every: int = 0  # DeepSpeed checkpoint every k steps (0: only at the end)
    # auto: continue from the newest checkpoint in `out`, or start fresh; a finished `out` (final/
    # exported at its last checkpoint) is reported and left as is. true: continue; false: refuse a used `out`.
    resume: Union[bool, Literal["auto"]] = "auto"
    seed: int = 0


@dataclass
class RewardConfig:
    """VARS reward (SPEC.md §5): r_acc + lambda_v * norm(r_visual) + lambda_f * r_format."""

    lambda_v: float = 0.3
    lambda_f: float = 0.1
    visual_norm: Literal["none", "squash", "group_z"] = "none"
    visual_gate: bool = True  # r_visual only for correct answers (SPEC.md §5); false: for every rollout (ablation)
    accuracy_weight: float = 1.0  # w_acc in w_acc * r_acc + ...; -1 (lambdas 0) flips every GRPO advantage (a control)
    verify_timeout_s: float = 10.0  # per answer: a verification past it is killed and scores 0 (reward/verify_timeouts)


@dataclass
class PerceptionConfig:
    """Visual-grounding objectives beside VARS (avar_ray/perception.py): PAPO and VPPO on one masked-image pass."""

    # The masked copy of each image, built from the processed pixel_values on the vision tower's patch grid,
    # seeded by rl.seed, the step, the sample and the image (a resumed run masks identically). patches: each
    # patch blackened with probability mask_ratio; noise: VPPO's Gaussian noise (std 189 of 255) on every pixel
    mask: Literal["patches", "noise"] = "patches"
    mask_ratio: Optional[float] = None  # None: the method's own, PAPO's 0.6 (also with both on), else VPPO's 0.5
    # PAPO: - papo_coef * KL(real || masked) + papo_entropy_coef * (H_real + H_masked) added to the update's
    # loss, per sampled token (PAPO's code: low_var_kl and -log p estimators). 0: off; paper (7B GRPO): 0.02
    papo_coef: float = 0.0
    papo_entropy_coef: float = 0.05  # the double-entropy regulariser, only with papo_coef > 0 (paper: 0.05)
    # false: the masked log-probs come from the no-grad score pass (PAPO's released code); true: a second
    # forward with grad on the masked image in the update (the paper's formula; PAPO's RECOMPUTE_AUG_LOG_PROBS)
    papo_masked_grad: bool = False
    # VPPO: per-token visual dependency (low_var_kl of the masked vs real log-prob, score pass, no grad); the
    # trajectory's mean rescales its advantage into [vppo_advantage_min, dynamic max] (mean 1 per mini-batch)
    # and only the top vppo_top_k share of each response's tokens gets the policy gradient. Paper (7B): 0.4, 0.9
    vppo: bool = False
    vppo_top_k: float = 0.4
    vppo_advantage_min: float = 0.9
    vppo_entropy_coef: float = 0.06  # VPPO's entropy penalty (-log p estimator) on every response token; 0: off


@dataclass
class PlacementConfig:
    rollout_workers: int = 1
    rollout_cpus: float = 1.0
    rollout_gpus: float = 0.0
    learners: int = 1
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    reward_cpus: float = 1.0  # the reward actor holds no model (text rewards + the combination)
    reward_gpus: float = 0.0
    reward_workers: int = 1  # scoring processes of the reward actor (CPU only; give it reward_cpus to match)
    learner_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "STRICT_PACK"  # learner group: one node (avar plan)
    max_restarts: int = 3  # restarts of a dead rollout worker / reward actor / learner group before the run fails


@dataclass
class RLConfig:
    out: str = "runs/rl"
    steps: int = 5
    prompts_per_step: int = 4
    n_samples: int = 4  # rollouts per prompt (GRPO group size)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-6
    zero_stage: int = 2
    clip_ratio: float = 0.2
    kl_coef: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4  # most rollouts per learner micro-batch
    max_tokens_per_micro_batch: int = 0  # token budget per micro-batch (prompt + response); 0: rows only
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per PPO epoch (the step's rollouts cut in this many)
    tis_cap: Optional[float] = None  # truncated IS weight min(pi_old / pi_vllm, cap) per token; None: off
    gradient_checkpointing: bool = False  # learner: recompute decoder activations in the backward
    freeze_vision: bool = False  # vision tower frozen in RL; only trainable weights are synced
    dynamic_sampling: bool = False  # DAPO: drop groups of equal rewards, refill from the sampler
    dynamic_sampling_max_refills: int = 2  # extra draws per step when dropping groups
    # Asynchronous GRPO: rollouts of steps s+1..s+k are generated while the learners train step s;
    # a step trains only on rollouts at most k policy versions old. 0: on-policy (avar_ray/rl/pipeline.py)
    max_staleness: int = 0
    max_image_pixels: int = 4096 * 4096  # per image; larger ones are filtered at load (counted)
    # Checkpoints (avar_ray/rl/checkpoint.py): the DeepSpeed state every save_every steps (0: only at the last step),
    # written while the next step generates; an HF export (rl.export_hf) at the last step and, with save_hf_every = k
    # > 0, at every k-th step too (such a step saves a checkpoint whatever save_every says). 0: the last step only
    save_every: int = 5
    save_hf_every: int = 0
    save_async: bool = True  # false: each step waits for its own checkpoint (the learners' save and export) to end
    # The prompts' checks (avar_ray/rl/prompts.py: images decoded, lengths against model.max_model_len) run once, in
    # prompt_workers processes (0: one per CPU core), and their verdicts are cached under <out>/prompt_cache, keyed
    # by the data files and the settings they depend on: a resume reads them. false: checked at every start
    prompt_workers: int = 0
    prompt_cache: bool = True
    # Held-out curve (avar_ray/rl/heldout.py): every eval_every steps (and at the start and the last step) the
    # current policy answers eval_data on the rollout engines: greedy and eval_samples samples at rl.temperature
    eval_every: int = 0  # 0: off
    eval_data: str = ""  # held-out data, read like data.train (prompts the run does not train on)
    eval_samples: int = 4  # samples per held-out prompt (accuracy_sampled, pass@k); 0: greedy only
    # broadcast: a persistent group from learner rank 0 to the rollout workers (nccl when both sides have whole
    # GPUs, else gloo); object_store: every sync through Ray's object store. The old value "nccl" is refused (no
    # alias): it named one transport of the two the broadcast picks between.
    weight_sync_backend: Literal["broadcast", "object_store"] = "broadcast"
    weight_sync_timeout_s: float = 300.0  # broadcast group: rendezvous and each collective (a peer that hangs)
    weight_sync_bucket_mb: float = 64.0
    # GPUs one vLLM engine spans (tensor parallel); each rollout worker then asks for this many times
    # rl.placement.rollout_gpus. UNTESTED on GPUs here (no GPU in CI); on CPU only validated and counted.
    rollout_tensor_parallel_size: int = 1
    enforce_eager: Optional[bool] = None  # vLLM; None: CUDA graphs on GPUs, eager on CPU (engines.start_llm)
    seed: int = 0
    kl_type: Literal["kl", "abs", "mse", "low_var_kl"] = "low_var_kl"  # verl's KL estimators
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    norm_adv_by_std: bool = True  # GRPO; False = Dr.GRPO (mean-centred only)
    weight_decay: float = 0.0
    max_images: int = 1  # per prompt; samples with more are skipped (counted)
    gpu_memory_utilization: float = 0.6  # vLLM, GPU only
    export_hf: bool = True  # HF exports beside the DeepSpeed checkpoints (rl.save_hf_every says which); false: none
    keep_checkpoints: int = 2  # newest DeepSpeed checkpoints kept (0: all)
    # auto: continue from the newest checkpoint in `out` (or start fresh); a run already at rl.steps is
    # reported and left as is. true: continue (also `avar rl --resume`); false: refuse an `out` with checkpoints.
    resume: Union[bool, Literal["auto"]] = "auto"
    reward: RewardConfig = field(default_factory=RewardConfig)
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)


@dataclass
class EvalConfig:
    """`avar eval`: generation (vLLM; transformers under the intervention), accuracy, VAS, report."""

    out: str = "runs/eval"
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    heatmaps: int = 3  # samples drawn with the response's attention over the image patches
    max_samples: int = -1  # per benchmark file; -1: all
    batch_size: int = 4  # rows per attention-statistics forward (and per transformers generate call)
    enforce_eager: Optional[bool] = None  # vLLM; None: CUDA graphs on GPUs, eager on CPU (engines.start_llm)
    gpu_memory_utilization: float = 0.6  # vLLM's share of the GPU (freed before the statistics pass)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the transformers model's device; auto: cuda if present
    seed: int = 0
    # Scale-out: 0 = one vLLM engine and one model in this process (no Ray); N >= 1 = Ray Data
    # with an actor pool of N vLLM engines and one of stats_workers statistics actors.
    num_engines: int = 0
    engine_gpus: float = 0.0  # per engine actor (tensor parallel inside one engine is not used)
    engine_cpus: float = 1.0
    stats_workers: int = 1  # actors of the statistics pass (transformers model each)
    stats_gpus: float = 0.0
    stats_cpus: float = 1.0
    resume: bool = True  # keep finished samples of an earlier run into the same out (same settings)


@dataclass
class ServeConfig:
    """`avar serve`: the Ray Serve app (answer + VAS telemetry), its limits and resources."""

    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: only behind your own auth
    port: int = 8000
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = 4000
    max_new_tokens: int = 256
    route_prefix: str = "/"
    max_ongoing_requests: int = 4  # per replica; requests beyond it queue in Serve's proxy
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the replica got a GPU


@dataclass
class TrackingConfig:
    """Experiment trackers of SFT, RL and eval; API keys are read from the environment only."""

    backends: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = field(
        default_factory=lambda: ["jsonl", "tensorboard"])
    project: str = "avar"  # W&B project and MLflow experiment
    run_name: Optional[str] = None  # None: "<stage>-<out dir name>"
    wandb_entity: Optional[str] = None
    wandb_mode: Literal["online", "offline"] = "online"  # offline: files under <out>/wandb (`wandb sync` later)
    mlflow_tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else a file store <out>/mlruns


@dataclass
class WarmBaseConfig:
    """The warm base (avar_ray/warm_base.py): the tiny model pre-trained on short procedural answers."""

    seed: int = 0
    vision_steps: int = 300  # dense scene-label pre-training of the vision tower (avar_ray/warm_vision.py)
    vision_batch_size: int = 32  # images per vision step
    vision_lr: float = 1e-3
    # The tasks it learns and is checked on: the easy set (procedural.EASY_TASKS), whose answers
    # the pre-trained tiny vision tower encodes; on the default mix it stayed at chance (measured).
    tasks: list[str] = field(default_factory=lambda: ["largest_colour", "count_colour"])
    n_train: int = 3000  # procedural training samples (short oracle chains)
    steps: int = 200  # AdamW steps of the whole model on the short chains
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    check_n: int = 120  # held-out procedural samples the cached base is checked on
    cache_dir: str = "~/.cache/avar-ray/warm_base"  # one folder per hash of the other settings


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS when set, else an embedded Ray; "local": always embedded
    num_cpus: Optional[int] = None


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    intervention: InterventionConfig = field(default_factory=InterventionConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    warm_base: WarmBaseConfig = field(default_factory=WarmBaseConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# ----------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is Union and type(None) not in get_args(tp):  # e.g. bool or "auto"
        return " or ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section), got {value!r}")
        return _build(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # pragma: no cover


# Keys merged into others or dropped: a YAML that still has one gets told where it went.
REMOVED_KEYS = {
    "sft.bf16": "use model.dtype: bfloat16 (it turns on DeepSpeed's bf16 in SFT and RL)",
    "sft.agto_layers": "use attention.layers (one layer selection for VAS and AGTO)",
    "attention.query": "it was never read (query spans: sft.agto_query in SFT, the response in RL, both in eval)",
    "rl.tensorboard": "use tracking.backends (e.g. [jsonl, tensorboard])",
    "rl.reward.visual_layers": "use attention.layers (one layer selection for VAS, AGTO and r_visual)",
    "rl.reward.eps": "use attention.eps (one epsilon for VAS, L_sup and r_visual)",
}


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if path in REMOVED_KEYS:
            raise ConfigError(f"{path}: removed; {REMOVED_KEYS[path]}")
        if key not in names:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A command-line value in YAML syntax: 1e-6, true, [0, 1], null, plain strings."""
    value = yaml.safe_load(text)
    # YAML 1.1 reads "1e-6" as a string (it wants "1.0e-6"); users type the former.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return values


def config_from_dict(values: dict) -> RunConfig:
    cfg = _build(RunConfig, values)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        values = loaded
    values = apply_overrides(values, list(overrides or []))
    return config_from_dict(values)


def _resources(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every Ray resource request in the config: the fields named
    ``*_cpus``, ``*_gpus`` and ``cpus_per_worker``."""
    found = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found += _resources(value, f"{key}.")
        elif f.name.endswith(("_cpus", "_gpus")) or f.name == "cpus_per_worker":
            found.append((key, value))
    return found


def validate(cfg: RunConfig) -> None:
    """Checks across fields that types alone cannot express."""
    negative = [key for key, value in _resources(cfg) if value is not None and value < 0]
    checks = [
        (not negative, f"{', '.join(negative)}: must be >= 0 (a Ray resource request)"),
        (0 < cfg.rl.gpu_memory_utilization <= 1, "rl.gpu_memory_utilization: must be in (0, 1] (vLLM's share of a GPU)"),
        (0 < cfg.eval.gpu_memory_utilization <= 1,
         "eval.gpu_memory_utilization: must be in (0, 1] (vLLM's share of a GPU)"),
        (0 <= cfg.intervention.a_sys < 1, "intervention.a_sys: must be in [0, 1) (a_sys = 1 removes the system span: log(0))"),
        (cfg.intervention.a_img > -1, "intervention.a_img: must be > -1"),
        (cfg.sft.zero_stage in (0, 1, 2, 3), "sft.zero_stage: must be 0, 1, 2 or 3"),
        (cfg.rl.zero_stage in (0, 1, 2, 3), "rl.zero_stage: must be 0, 1, 2 or 3"),
        (cfg.rl.n_samples >= 2, "rl.n_samples: GRPO needs at least 2 rollouts per prompt"),
        (cfg.attention.chunk_size is None or cfg.attention.chunk_size > 0,
         "attention.chunk_size: must be positive (or null: the automatic choice)"),
        (cfg.rl.placement.rollout_workers >= 1, "rl.placement.rollout_workers: must be >= 1"),
        (min(cfg.rl.save_every, cfg.rl.save_hf_every, cfg.rl.prompt_workers) >= 0,
         "rl.save_every, rl.save_hf_every, rl.prompt_workers: must be >= 0 (0: the last step only / one process per core)"),
        (cfg.rl.placement.learners >= 1, "rl.placement.learners: must be >= 1"),
        (cfg.rl.placement.reward_workers >= 1 and cfg.rl.reward.verify_timeout_s > 0,
         "rl.placement.reward_workers: must be >= 1; rl.reward.verify_timeout_s: must be > 0"),
        (cfg.synth.rows_per_shard >= 1, "synth.rows_per_shard: must be >= 1"),
        (cfg.synth.batch_size >= 1, "synth.batch_size: must be >= 1"),
        (cfg.synth.num_actors >= 1, "synth.num_actors: must be >= 1"),
        (all(0.0 <= p <= 1.0 for p in cfg.synth.anchor_positions), "synth.anchor_positions: must lie in [0, 1]"),
        (cfg.sft.num_workers >= 1, "sft.num_workers: must be >= 1"),
        (cfg.sft.micro_batch_size >= 1 and cfg.sft.grad_accum >= 1, "sft.micro_batch_size, sft.grad_accum: must be >= 1"),
        (0.0 <= cfg.sft.warmup_ratio < 1.0, "sft.warmup_ratio: must be in [0, 1)"),
        (cfg.sft.alpha >= 0 and cfg.sft.beta >= 0, "sft.alpha, sft.beta: must be >= 0"),
        (cfg.rl.prompts_per_step * cfg.rl.n_samples >= cfg.rl.placement.learners * cfg.rl.mini_batches,
         "rl.prompts_per_step * rl.n_samples: must be >= rl.placement.learners * rl.mini_batches (a rollout "
         "per rank and mini-batch)"),
        (min(cfg.rl.steps, cfg.rl.prompts_per_step, cfg.rl.micro_batch_size, cfg.rl.ppo_epochs, cfg.rl.mini_batches,
             cfg.rl.max_new_tokens, cfg.rl.max_images, cfg.rl.max_image_pixels) >= 1,
         "rl.steps/prompts_per_step/micro_batch_size/ppo_epochs/mini_batches/max_new_tokens/max_images/max_image_pixels: "
         "must be >= 1"),
        (cfg.rl.tis_cap is None or cfg.rl.tis_cap > 0, "rl.tis_cap: must be positive (or null: off)"),
        (cfg.rl.max_tokens_per_micro_batch >= 0 and cfg.rl.dynamic_sampling_max_refills >= 0,
         "rl.max_tokens_per_micro_batch, rl.dynamic_sampling_max_refills: must be >= 0"),
        (cfg.rl.weight_sync_bucket_mb > 0 and cfg.rl.weight_sync_timeout_s > 0,
         "rl.weight_sync_bucket_mb, rl.weight_sync_timeout_s: must be positive"),
        (cfg.rl.max_staleness >= 0, "rl.max_staleness: must be >= 0 (0: on-policy)"),
        (cfg.rl.eval_every >= 0 and cfg.rl.eval_samples >= 0, "rl.eval_every, rl.eval_samples: must be >= 0"),
        (not cfg.rl.eval_every or bool(cfg.rl.eval_data), "rl.eval_data: a held-out data file is needed when rl.eval_every > 0"),
        (cfg.rl.rollout_tensor_parallel_size >= 1, "rl.rollout_tensor_parallel_size: must be >= 1"),
        (cfg.rl.rollout_tensor_parallel_size == 1 or cfg.rl.placement.rollout_gpus > 0,
         "rl.rollout_tensor_parallel_size: > 1 needs GPUs (rl.placement.rollout_gpus > 0 per tensor-parallel rank)"),
        (all(p is None or p >= 1 for p in (cfg.model.min_pixels, cfg.model.max_pixels)),
         "model.min_pixels, model.max_pixels: must be >= 1 (or null)"),
        (None in (cfg.model.min_pixels, cfg.model.max_pixels) or cfg.model.min_pixels <= cfg.model.max_pixels,
         "model.min_pixels: must be <= model.max_pixels"),
        (cfg.rl.temperature > 0, "rl.temperature: must be positive (GRPO samples)"),
        *perception_checks(cfg.rl.perception),
        (cfg.eval.batch_size >= 1, "eval.batch_size: must be >= 1"),
        (cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens: must be >= 1"),
        (cfg.eval.num_engines >= 0 and cfg.eval.stats_workers >= 1,
         "eval.num_engines: must be >= 0; eval.stats_workers: must be >= 1"),
        (cfg.serve.replicas >= 1, "serve.replicas: must be >= 1"),
        (min(cfg.serve.max_image_bytes, cfg.serve.max_image_pixels, cfg.serve.max_prompt_chars,
             cfg.serve.max_new_tokens) >= 1, "serve.max_*: limits must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def perception_checks(p: PerceptionConfig) -> list[tuple[bool, str]]:
    return [
        (p.mask_ratio is None or 0 < p.mask_ratio <= 1,
         "rl.perception.mask_ratio: must be in (0, 1] (the share of patches masked) or null (the method's own)"),
        (min(p.papo_coef, p.papo_entropy_coef, p.vppo_entropy_coef) >= 0,
         "rl.perception.papo_coef, papo_entropy_coef, vppo_entropy_coef: must be >= 0"),
        (0 < p.vppo_top_k <= 1, "rl.perception.vppo_top_k: must be in (0, 1] (the share of each response's tokens kept)"),
        (0 <= p.vppo_advantage_min <= 1, "rl.perception.vppo_advantage_min: must be in [0, 1] (the scales average 1)"),
        (not p.papo_masked_grad or p.papo_coef > 0,
         "rl.perception.papo_masked_grad: needs rl.perception.papo_coef > 0 (PAPO on)"),
        (p.mask == "patches" or p.mask_ratio is None,
         "rl.perception.mask_ratio: unused with rl.perception.mask noise (every pixel is perturbed); leave it null"),
    ]


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def reference_markdown() -> str:
    """The config reference (docs/config_reference.md), generated from the dataclasses."""
    lines = ["# Config reference", "",
             "Generated by `avar config-doc` from `avar_ray/config.py`; a test keeps it in sync.", ""]

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows = []
        subsections = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            path = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(tp):
                subsections.append((tp, path))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(f"| `{path}` | {_type_name(tp)} | `{default!r}` |")
        if rows:
            lines.append(f"## `{prefix or 'top level'}`" + (f" — {cls.__doc__.strip().splitlines()[0]}" if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""))
            lines.append("")
            lines.append("| key | type | default |")
            lines.append("| --- | --- | --- |")
            lines.extend(rows)
            lines.append("")
        for sub, path in subsections:
            section(sub, path)

    section(RunConfig, "")
    return "\n".join(lines)
