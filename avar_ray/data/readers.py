"""Benchmark files -> Samples. A bad row is skipped, counted by reason and logged with its file
and row; a file that cannot be read at all raises an error naming the path."""

from __future__ import annotations

import ast
import json
import logging
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from avar_ray.data import fields as F
from avar_ray.data import sources
from avar_ray.data.fields import RowError
from avar_ray.data.schema import LETTERS, Sample

log = logging.getLogger("avar_ray.data")


@dataclass
class ReadReport:
    loaded: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)  # reason -> count
    bad_rows: list[tuple[str, str, str]] = field(default_factory=list)  # (file, row, reason)

    def skip(self, file: str, row: str, error: RowError) -> None:
        self.skipped += 1
        self.reasons[error.reason] += 1
        self.bad_rows.append((file, row, str(error)))
        log.warning("%s: row %s skipped: %s", file, row, error)

    def merge(self, other: "ReadReport") -> "ReadReport":
        self.loaded += other.loaded
        self.skipped += other.skipped
        self.reasons.update(other.reasons)
        self.bad_rows.extend(other.bad_rows)
        return self

    def __str__(self) -> str:
        why = ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common())
        return f"loaded {self.loaded}, skipped {self.skipped}" + (f" ({why})" if why else "")


RowParser = Callable[[dict[str, Any], str], Sample]


@dataclass(frozen=True)
class DataKeys:
    """The columns of a plain row (``data.prompt_key``, ``data.answer_key``, ``data.image_key``):
    EasyR1/verl data names them e.g. ``problem``, ``answer``, ``images``."""

    prompt: str
    answer: str
    image: str

    @classmethod
    def of(cls, data_cfg=None) -> "DataKeys":
        """From a ``DataConfig`` (None: its defaults, this project's own column names)."""
        if data_cfg is None:
            from avar_ray.config import DataConfig

            data_cfg = DataConfig()
        return cls(data_cfg.prompt_key, data_cfg.answer_key, data_cfg.image_key)


def _collect(
    path: Path, rows: Iterable[tuple[str, Any]], parse: RowParser, report: ReadReport
) -> list[Sample]:
    samples = []
    for key, row in rows:
        try:
            if isinstance(row, RowError):  # a line that did not even parse
                raise row
            if not isinstance(row, dict):
                raise RowError("bad row", f"row is a {type(row).__name__}, not an object")
            samples.append(parse(row, key))
            report.loaded += 1
        except RowError as exc:
            report.skip(str(path), key, exc)
        except ValueError as exc:  # Sample's own checks
            report.skip(str(path), key, RowError("bad row", str(exc)))
    return samples


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    return path


def _located(path: str | Path, image_root: str | Path | None) -> tuple[Path, Path]:
    """The data file (it must exist) and the directory its relative image paths resolve against."""
    path = _existing(path)
    return path, Path(image_root) if image_root is not None else path.parent


# ---------------------------------------------------------------- JSON / JSONL


def json_rows(path: Path) -> list[tuple[str, Any]]:
    """(row key, row) pairs from a JSON dict/list or a JSONL file; bad JSONL lines come back
    as RowError values so that they are counted like any other bad row."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows: list[tuple[str, Any]] = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                rows.append((f"line {n}", RowError("invalid JSON", str(exc))))
        if rows and all(isinstance(r, RowError) for _, r in rows):
            raise ValueError(f"{path}: not a JSONL file (no line parses as JSON)")
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        return [(str(k), v) for k, v in data.items()]
    if isinstance(data, list):
        return [(str(i), v) for i, v in enumerate(data)]
    raise ValueError(f"{path}: expected a JSON object keyed by id or a list of rows")


_MATHVISTA_MOVED = {"question", "answer", "choices", "decoded_image", "precision", "answer_type"}


def _mathvista_sample(row: dict[str, Any], key: str, base_dir: Path, source: str) -> Sample:
    pid = str(row.get("pid") if not F.is_empty(row.get("pid")) else key)
    question = F.text_field(row, "question")
    answer = F.text_field(row, "answer")
    qtype = row.get("question_type") or ("multi_choice" if row.get("choices") else "free_form")
    choices = F.string_list(row.get("choices"), "choices")
    precision = None
    meta = F.clean_meta(row, _MATHVISTA_MOVED)
    meta["source_answer_type"] = row.get("answer_type")
    if qtype == "multi_choice":
        if not choices:
            raise RowError("bad field", "multi_choice question without choices")
        meta["answer_text"] = answer
        answer, answer_type = F.choice_letter(answer, choices), "choice"
    elif qtype == "free_form":
        answer_type = F.check_answer_type(row.get("answer_type"))
        if answer_type == "choice":
            raise RowError("unknown answer_type", "free_form question with answer_type 'choice'")
        F.check_numeric(answer, answer_type)
        precision = F.opt_precision(row.get("precision")) if answer_type == "float" else None
        choices = []
    else:
        raise RowError("bad field", f"unknown question_type {qtype!r}")
    decoded, image = row.get("decoded_image"), row.get("image")
    if not F.is_empty(decoded):  # base64 text or bytes (the HF release)
        data = F.image_value(decoded, base_dir)
    elif isinstance(image, str) and image.strip():  # a path, relative to the image root
        data = F.image_from_path(image.strip(), base_dir)
    elif not F.is_empty(image):
        data = F.image_value(image, base_dir)
    else:
        raise RowError("missing image", "neither 'decoded_image' nor 'image' is set")
    return Sample(id=pid, question=question, answer=answer,
                  answer_type=answer_type,  # type: ignore[arg-type]
                  images=[data], choices=choices, precision=precision, source=source, meta=meta)


def read_mathvista(
    path: str | Path, image_root: str | Path | None = None
) -> tuple[list[Sample], ReadReport]:
    """MathVista layout (JSON dict keyed by pid, JSON list, or JSONL). Image paths resolve
    against image_root, else the file's directory."""
    path, base = _located(path, image_root)
    report = ReadReport()
    samples = _collect(path, json_rows(path),
                       lambda row, key: _mathvista_sample(row, key, base, "mathvista"), report)
    return samples, report


# ---------------------------------------------------------------- plain rows (JSONL / Parquet)


def _plain_sample(row: dict[str, Any], key: str, base_dir: Path, source: str, keys: DataKeys) -> Sample:
    question = F.text_field(row, keys.prompt)
    answer = F.unboxed(F.text_field(row, keys.answer))
    given = [row.get(k) for k in (keys.image, "image") if not F.is_empty(row.get(k)) and row.get(k) != []]
    if given:  # a list of images, or one
        images = [F.image_value(v, base_dir) for v in (given[0] if isinstance(given[0], (list, tuple)) else [given[0]])]
    elif not F.is_empty(row.get("image_path")):
        images = [F.image_from_path(str(row["image_path"]), base_dir)]
    else:
        raise RowError("missing image", f"none of '{keys.image}', 'image', 'image_path' is set (a text-only "
                       "prompt: every stage needs an image, and a rank without one would hang ZeRO-3)")
    F.check_placeholders(question, len(images))
    choices = F.string_list(row.get("choices"), "choices")
    answer_type = row.get("answer_type")
    if F.is_empty(answer_type):
        answer_type = "choice" if choices else F.numeric_kind(answer)[0]
    answer_type = F.check_answer_type(answer_type)
    precision = F.opt_precision(row.get("precision"))
    if answer_type == "choice":
        # An explicit "choice" row (our own format) already holds the letter.
        explicit = not F.is_empty(row.get("answer_type"))
        if choices and not (explicit and answer in LETTERS[: len(choices)]):
            answer = F.choice_letter(answer, choices)
        elif not choices:
            answer = answer.upper()
    elif answer_type in ("integer", "float"):
        F.check_numeric(answer, answer_type)
    meta = row.get("meta")
    if isinstance(meta, str):  # our own row format keeps meta as JSON text
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise RowError("bad field", f"meta is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        meta = F.clean_meta(row, {"id", "question", "answer", "answer_type", "choices", "precision", "images",
                                  "image", "source", "meta", keys.prompt, keys.answer, keys.image})
    row_id = str(row["id"]) if not F.is_empty(row.get("id")) else f"{source}-{key}"
    return Sample(id=row_id, question=question, answer=answer,
                  answer_type=answer_type,  # type: ignore[arg-type]
                  images=images, choices=choices, precision=precision,
                  source=str(row.get("source") or source), meta=meta)


def read_jsonl(
    path: str | Path, image_root: str | Path | None = None, keys: DataKeys | None = None
) -> tuple[list[Sample], ReadReport]:
    """JSONL rows in our row format, or with an image / image_path field (paths resolve
    against image_root, else the file's directory); ``keys`` names the prompt, answer and image fields."""
    path, base = _located(path, image_root)
    keys = keys or DataKeys.of()
    report = ReadReport()
    samples = _collect(path, json_rows(path),
                       lambda row, key: _plain_sample(row, key, base, path.stem, keys), report)
    return samples, report


def read_table(
    path: str | Path, image_root: str | Path | None = None, keys: DataKeys | None = None
) -> tuple[list[Sample], ReadReport]:
    """Parquet (or an Arrow file of a ``datasets`` directory) in our row format (to_row), with
    the columns ``keys`` names, an image / image_path column, or MathVista's HF release (pid,
    question_type, decoded_image)."""
    path, base = _located(path, image_root)
    if path.suffix.lower() == ".arrow":
        table = sources.read_arrow(path)
    else:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: not a readable Parquet table: {exc}") from exc
    keys = keys or DataKeys.of()
    report = ReadReport()
    rows = ((str(i), r) for i, r in enumerate(table.to_pylist()))
    if {"pid", "question_type"} <= set(table.column_names):
        parse: RowParser = lambda row, key: _mathvista_sample(row, key, base, "mathvista")  # noqa: E731
    else:
        parse = lambda row, key: _plain_sample(row, key, base, path.stem, keys)  # noqa: E731
    samples = _collect(path, rows, parse, report)
    return samples, report


# ---------------------------------------------------------------- VLMEvalKit TSV

_OPTION_COLUMNS = string.ascii_uppercase
_TSV_MOVED = {"image", "question", "answer", "hint"} | set(_OPTION_COLUMNS)


def _tsv_images(value: str, refs: dict[str, str], base_dir: Path) -> list[bytes]:
    """A cell holds base64, a list of them ("['...', '...']"), or the index of another row
    whose image it shares (VLMEvalKit's de-duplication: a value of <= 64 characters)."""
    value = value.strip()
    items: list[Any] = [value]
    if value.startswith("[") and value.endswith("]"):
        try:
            items = list(ast.literal_eval(value))
        except (ValueError, SyntaxError) as exc:
            raise RowError("corrupt image", f"unparseable image list: {exc}") from exc
    out = []
    for item in items:
        item = str(item).strip()
        if len(item) <= 64 and not F.looks_like_path(item):
            if item not in refs:
                raise RowError("missing image", f"image refers to row index {item!r}, not found")
            item = refs[item]
        out.append(F.image_value(item, base_dir))
    return out


def _tsv_sample(row: dict[str, str], key: str, refs: dict[str, str], base_dir: Path,
                source: str) -> Sample:
    question = F.text_field(row, "question")
    answer = F.text_field(row, "answer")
    options: list[str] = []
    for col in _OPTION_COLUMNS:
        if col not in row:
            break
        if F.is_empty(row[col]):
            later = [c for c in _OPTION_COLUMNS[_OPTION_COLUMNS.index(col) + 1:]
                     if c in row and not F.is_empty(row[c])]
            if later:
                raise RowError("bad field", f"option {col} is empty but {later[0]} is not")
            break
        options.append(row[col])
    precision = None
    if options:
        answer, answer_type = F.choice_letter(answer, options), "choice"
    else:
        answer_type, precision = F.numeric_kind(answer)
    if not F.is_empty(row.get("image")):
        images = _tsv_images(row["image"], refs, base_dir)
    elif not F.is_empty(row.get("image_path")):
        images = [F.image_from_path(row["image_path"], base_dir)]
    else:
        raise RowError("missing image", "empty 'image' and 'image_path'")
    hint = row.get("hint")
    if not F.is_empty(hint):  # VLMEvalKit puts the hint before the question in its prompt
        question = f"Hint: {hint}\n{question}"
    meta = {k: v for k, v in row.items() if k not in _TSV_MOVED and not F.is_empty(v)}
    if not F.is_empty(hint):
        meta["hint"] = hint
    return Sample(id=key, question=question, answer=answer,
                  answer_type=answer_type,  # type: ignore[arg-type]
                  images=images, choices=options, precision=precision, source=source, meta=meta)


def read_vlmeval_tsv(
    path: str | Path, image_root: str | Path | None = None
) -> tuple[list[Sample], ReadReport]:
    """VLMEvalKit TSV (index, image base64, question, answer, options A, B, ...); image_root
    resolves an image_path column (default: the file's directory)."""
    path, base = _located(path, image_root)
    try:
        # dtype=str and no NA parsing: an option whose text is "None" or "NA" stays an option.
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable TSV table: {exc}") from exc
    missing = [c for c in ("question", "answer") if c not in df.columns]
    if missing or not {"image", "image_path"} & set(df.columns):
        raise ValueError(f"{path}: not a VLMEvalKit TSV (missing columns: "
                         f"{missing or ['image or image_path']})")
    rows = df.to_dict("records")
    keys = [str(r["index"]) if "index" in r and not F.is_empty(r["index"]) else str(i)
            for i, r in enumerate(rows)]
    refs = {k: r["image"] for k, r in zip(keys, rows) if len(str(r.get("image", ""))) > 64}
    report = ReadReport()
    samples = _collect(path, zip(keys, rows),
                       lambda row, key: _tsv_sample(row, key, refs, base, path.stem), report)
    return samples, report


# ---------------------------------------------------------------- dispatch


def _first_json_line(path: Path) -> Optional[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return row if isinstance(row, dict) else None
    return None


def read_file(path: str | Path, image_root: str | Path | None = None,
              keys: DataKeys | None = None) -> tuple[list[Sample], ReadReport]:
    """Dispatch on extension (and, for .jsonl, on content): .tsv VLMEvalKit, .parquet / .arrow
    table, .json MathVista, .jsonl MathVista-like when rows have a pid, else plain rows."""
    path = _existing(path)
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return read_vlmeval_tsv(path, image_root)
    if suffix in (".parquet", ".arrow"):
        return read_table(path, image_root, keys)
    if suffix == ".json":
        return read_mathvista(path, image_root)
    if suffix == ".jsonl":
        first = _first_json_line(path)
        if first is not None and "pid" in first:
            return read_mathvista(path, image_root)
        return read_jsonl(path, image_root, keys)
    raise ValueError(f"{path}: unknown data file type {suffix!r} (expected .tsv, .parquet, "
                     f".json or .jsonl)")


def read_samples(source: str | Path, image_root: str | Path | None = None,
                 keys: DataKeys | None = None) -> tuple[list[Sample], ReadReport]:
    """One source (``sources.data_files``: a file, a folder of shards, a glob, a ``datasets``
    directory) read as one: samples in file order, one report naming each bad row's file. Image
    paths resolve against ``image_root``, else each file's directory."""
    samples: list[Sample] = []
    report = ReadReport()
    for path in sources.data_files(source):
        got, got_report = read_file(path, image_root, keys)
        samples.extend(got)
        report.merge(got_report)
    return samples, report
