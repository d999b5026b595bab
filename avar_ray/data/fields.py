"""Field parsing shared by the benchmark readers. Each helper raises RowError, whose reason is a
short category (counted in the ReadReport) and whose detail says what exactly was wrong."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from avar_ray.data.schema import ANSWER_TYPES, LETTERS, ImageDecodeError, decode_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_INT = re.compile(r"^[+-]?\d+$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


class RowError(ValueError):
    """One bad row: skipped and counted by `reason`, the rest of the file still loads."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def is_empty(value: Any) -> bool:
    """None, NaN, or blank text (pandas writes a missing TSV cell as an empty field)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return value.strip() == "" or value.strip().lower() == "nan"
    return False


def text_field(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if is_empty(value):
        raise RowError(f"missing {name}", f"field '{name}' is empty or absent")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError("bad field type", f"'{name}' is a {type(value).__name__}")
    return str(value).strip() if name == "answer" else str(value)


# ---------------------------------------------------------------- images


def _validated(data: bytes, what: str) -> bytes:
    try:
        decode_image(data)
    except ImageDecodeError as exc:
        raise RowError("corrupt image", f"{what}: {exc}") from exc
    return data


def looks_like_path(text: str) -> bool:
    return len(text) < 4096 and text.lower().endswith(IMAGE_SUFFIXES)


def image_from_path(name: str, base_dir: Path) -> bytes:
    path = Path(name)
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise RowError("missing image", f"file not found: {path}")
    return _validated(path.read_bytes(), str(path))


def image_from_base64(text: str) -> bytes:
    if text.startswith("data:"):  # data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RowError("corrupt image", f"invalid base64: {exc}") from exc
    return _validated(data, "base64 image")


def image_value(value: Any, base_dir: Path) -> bytes:
    """Encoded bytes from bytes, a HF image struct {"bytes", "path"}, a path, or base64 text."""
    if is_empty(value):
        raise RowError("missing image", "no image given")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _validated(bytes(value), "image bytes")
    if isinstance(value, dict):
        if value.get("bytes"):
            return _validated(bytes(value["bytes"]), "image bytes")
        if value.get("path"):
            return image_from_path(str(value["path"]), base_dir)
        raise RowError("missing image", "image struct has neither bytes nor path")
    if isinstance(value, str):
        value = value.strip()
        if looks_like_path(value):
            return image_from_path(value, base_dir)
        return image_from_base64(value)
    raise RowError("bad field type", f"image is a {type(value).__name__}")


def check_placeholders(question: str, num_images: int) -> None:
    """A prompt that marks its images with ``<image>`` marks each of them once."""
    from avar_ray.data.schema import IMAGE_PLACEHOLDER

    marks = question.count(IMAGE_PLACEHOLDER)
    if marks and marks != num_images:
        raise RowError("image placeholders", f"{marks} {IMAGE_PLACEHOLDER} in the prompt for {num_images} images")


# ---------------------------------------------------------------- answers

_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)


def unboxed(answer: str) -> str:
    """A ground truth written as ``\\boxed{x}`` (EasyR1/verl math data) is ``x``."""
    match = _BOXED.match(answer.strip())
    return match.group(1).strip() if match else answer


def choice_letter(answer: str, choices: list[str]) -> str:
    """The option letter of `answer`: its exact option text, the text up to case and
    whitespace, or a letter already within range."""
    if answer in choices:
        return LETTERS[choices.index(answer)]
    folded = [" ".join(c.split()).casefold() for c in choices]
    key = " ".join(answer.split()).casefold()
    if key in folded:
        return LETTERS[folded.index(key)]
    if len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        return answer.upper()
    raise RowError("answer not among choices", f"answer {answer!r} matches none of {choices!r}")


def numeric_kind(answer: str) -> tuple[str, Optional[int]]:
    """("integer", None), ("float", decimals) or ("text", None) for an answer string."""
    text = answer.strip()
    if _THOUSANDS.match(text):  # "1,000" is an integer, "1,2" is not a number
        text = text.replace(",", "")
    if _INT.match(text):
        return "integer", None
    if _FLOAT.match(text):
        mantissa = text.split("e")[0].split("E")[0]
        return "float", len(mantissa.partition(".")[2])
    return "text", None


def check_answer_type(answer_type: Any) -> str:
    if answer_type == "list":
        raise RowError("unsupported answer_type", "answer_type 'list' is not supported")
    if answer_type not in ANSWER_TYPES:
        raise RowError("unknown answer_type", f"answer_type {answer_type!r}")
    return str(answer_type)


def check_numeric(answer: str, answer_type: str) -> None:
    kind, _ = numeric_kind(answer)
    if answer_type == "integer" and kind != "integer":
        raise RowError("bad answer", f"answer {answer!r} is not an integer")
    if answer_type == "float" and kind not in ("integer", "float"):
        raise RowError("bad answer", f"answer {answer!r} is not a number")


def opt_precision(value: Any) -> Optional[int]:
    if is_empty(value):
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError) as exc:
        raise RowError("bad field type", f"precision {value!r}") from exc


def string_list(value: Any, name: str) -> list[str]:
    if is_empty(value):
        return []
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
    ):
        raise RowError("bad field type", f"'{name}' must be a list of strings")
    return [str(v) for v in value]


def clean_meta(row: dict[str, Any], drop: set[str]) -> dict[str, Any]:
    """The JSON-serialisable source fields minus `drop` (image payloads, fields the Sample
    holds itself)."""
    meta = {}
    for key, value in row.items():
        if key in drop:
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        meta[str(key)] = value
    return meta
