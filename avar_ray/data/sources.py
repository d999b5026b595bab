"""Where a data key points, as the list of files read as one source: one file, a folder of
Parquet/JSONL shards, a glob, or an HF ``datasets`` directory (``Dataset.save_to_disk``: Arrow
stream files listed in ``state.json``, read with pyarrow, so ``datasets`` need not be installed).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pyarrow as pa

SHARD_SUFFIXES = (".parquet", ".jsonl")  # what a folder of shards holds
HF_STATE = "state.json"


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and (path / HF_STATE).is_file() and (path / "dataset_info.json").is_file()


def _hf_arrow_files(path: Path) -> list[Path]:
    try:
        state = json.loads((path / HF_STATE).read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a `datasets` save_to_disk directory ({HF_STATE}: {exc!r})") from exc
    files = [path / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"{path}: {HF_STATE} lists Arrow files that are not there: {missing or 'none'}")
    return files


def data_files(source: str | Path) -> list[Path]:
    """The files of ``source`` in read order (sorted names); an error naming ``source`` when it
    holds none."""
    text = str(source)
    path = Path(text)
    if path.is_file():
        return [path]
    if is_hf_dataset(path):
        return _hf_arrow_files(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if is_hf_dataset(p))
            raise ValueError(f"{path}: a `datasets` DatasetDict; name one split's directory "
                             f"({', '.join(str(path / s) for s in splits) or 'none found'})")
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SHARD_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: a directory with no {' or '.join(SHARD_SUFFIXES)} files")
        return files
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no data files match {text}")
        return files
    raise FileNotFoundError(f"no such data file or directory: {path}")


def exists(source: str | Path) -> bool:
    try:
        return bool(data_files(source))
    except (FileNotFoundError, ValueError):
        return False


def read_arrow(path: Path) -> pa.Table:
    """An Arrow file as ``datasets`` writes it (the IPC stream format; the file format too)."""
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        try:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_file(source).read_all()
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: not a readable Arrow file: {exc}") from exc
