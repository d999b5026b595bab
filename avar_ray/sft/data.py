"""Training rows for the cold-start SFT: where they come from, how they become model inputs.

A training row is a sample row (``schema.to_row``) plus ``target`` (the assistant turn,
``<think>...</think><answer>...</answer>``), as the synthesis stage writes them. The prompt is
``schema.build_messages(sample, model.system_prompt)``, the same one the RL and eval stages use
(at the same ``model.min_pixels`` / ``max_pixels``); the loss covers
only the assistant turn (span R: the target and its closing ``<|im_end|>``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa
import torch

from avar_ray.config import ModelConfig
from avar_ray.data.schema import build_messages, from_row, pil_images
from avar_ray.modeling import Encoded, encode_batch

IGNORE_INDEX = -100
COLUMNS = ["id", "question", "answer", "answer_type", "choices", "precision", "images", "source", "meta", "target"]


def training_files(path: str | Path) -> list[str]:
    """Parquet files of a synthesis output directory (committed shards only), a directory of
    Parquet files, or one Parquet file."""
    from avar_ray.synth.shards import committed_shards

    path = Path(path)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"sft.data: no such file or directory: {path}")
    return [str(p) for p in committed_shards(path)]


def check_columns(files: Sequence[str]) -> None:
    import pyarrow.parquet as pq

    for f in files:
        names = set(pq.read_schema(f).names)
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise ValueError(f"sft.data: {f} lacks column(s) {missing} (expected synthesis output rows)")


def require_system_turn_for_agto(files: Sequence[str], model: ModelConfig, beta: float) -> None:
    """L_sup = log(S mass + eps) needs the system span: with ``sft.beta > 0`` on a chat template
    that adds no system turn (Qwen3-VL) and no ``model.system_prompt`` it would be 0 on every
    row, silently. Refused before any worker starts, naming the key (the first row decides: every
    row gets the same system turn). L_enh reads only V, so ``sft.alpha`` alone needs no S."""
    import pyarrow.parquet as pq

    from avar_ray.modeling import require_system_turn
    from avar_ray.modeling import load_processor

    if beta <= 0 or not files:
        return
    rows = next(pq.ParquetFile(files[0]).iter_batches(batch_size=1, columns=COLUMNS), None)
    if rows is not None and rows.num_rows:
        require_system_turn(load_processor(model.path, model), from_row(rows.to_pylist()[0]), model.system_prompt,
                            f"sft.beta = {beta} (L_sup, the system-attention term)", "set sft.beta=0")


def encode_rows(processor, rows: Sequence[dict], system_prompt: str | None = None) -> tuple[Encoded, torch.Tensor]:
    """A right-padded batch of prompt + target, and labels that are the input ids on the
    assistant turn and ``IGNORE_INDEX`` everywhere else."""
    samples = [from_row(r) for r in rows]
    encoded = encode_batch(processor, [build_messages(s, system_prompt) for s in samples], [pil_images(s) for s in samples],
                           response_texts=[str(r["target"]) for r in rows], padding_side="right")
    labels = encoded.inputs["input_ids"].masked_fill(~encoded.spans.response, IGNORE_INDEX)
    return encoded, labels


class TokenLengths:
    """Ray Data callable class: adds ``num_tokens`` (prompt + target, images expanded) per row."""

    def __init__(self, model: ModelConfig) -> None:
        from avar_ray.modeling import load_processor

        self.processor = load_processor(model.path, model)
        self.system_prompt = model.system_prompt

    def __call__(self, batch):
        rows = batch.to_pylist()
        lengths = []
        for row in rows:
            encoded, _ = encode_rows(self.processor, [row], self.system_prompt)
            lengths.append(int(encoded.inputs["attention_mask"].sum()))
        return batch.append_column("num_tokens", pa.array(lengths, type=pa.int64()))


def prepare_dataset(files: Sequence[str], model: ModelConfig, max_length: int, seed: int, shuffle: bool):
    """The Ray Data dataset of rows that fit ``max_length`` tokens; returns (dataset, kept
    rows, rows skipped as too long). Materialised: the count and the split need it anyway.

    Block order is preserved, so the seeded shuffle (and with it every step's batch) is the
    same in every run: a resumed run and an uninterrupted one see the same data.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        ds = ray.data.read_parquet(list(files), columns=COLUMNS)
        ds = ds.map_batches(TokenLengths, fn_constructor_kwargs={"model": model}, batch_format="pyarrow",
                            batch_size=16, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
        ds = ds.materialize()
        total = ds.count()
        ds = ds.filter(expr=f"num_tokens <= {int(max_length)}")
        if shuffle:
            ds = ds.random_shuffle(seed=seed)
        ds = ds.materialize()
    finally:
        context.execution_options.preserve_order = preserve
    kept = ds.count()
    return ds, kept, total - kept
