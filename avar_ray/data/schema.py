"""The one sample type used by every stage, its Parquet row form, and prompt building."""

from __future__ import annotations

import io
import json
import math
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

AnswerType = Literal["choice", "integer", "float", "text"]
ANSWER_TYPES: tuple[str, ...] = ("choice", "integer", "float", "text")
LETTERS = string.ascii_uppercase
# Above this an image is almost surely a mistake (or a decompression bomb), not a benchmark figure.
MAX_PIXELS = 50_000_000

DEFAULT_INSTRUCTION = (
    "Think step by step inside <think></think>, then give the final answer inside <answer></answer>."
)

PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answer_type", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("precision", pa.int64()),
        ("images", pa.list_(pa.binary())),
        ("source", pa.string()),
        ("meta", pa.string()),
    ]
)


class ImageDecodeError(ValueError):
    """Image bytes that PIL cannot decode, or an image too large to accept."""


@dataclass
class Sample:
    id: str
    question: str
    # Ground truth: a choice letter "A".."Z" for multiple choice, else the answer text/number.
    answer: str
    answer_type: AnswerType
    images: list[bytes]  # encoded image files (PNG/JPEG bytes)
    choices: list[str] = field(default_factory=list)  # option texts in order A, B, C, ...
    precision: Optional[int] = None  # decimal places for float answers (MathVista "precision")
    source: str = ""
    meta: dict = field(default_factory=dict)  # JSON-serialisable source fields kept

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"sample {self.id!r}: unknown answer_type {self.answer_type!r}")
        if self.answer_type == "choice":
            # Choices may live inside the question text (choices == []): then any letter goes.
            n = len(self.choices) if self.choices else len(LETTERS)
            if len(self.answer) != 1 or self.answer not in LETTERS[:n]:
                raise ValueError(
                    f"sample {self.id!r}: choice answer {self.answer!r} is not a letter "
                    f"A..{LETTERS[n - 1]}"
                )


def letter(index: int) -> str:
    return LETTERS[index]


# ---------------------------------------------------------------- Parquet rows


def to_row(sample: Sample) -> dict[str, Any]:
    """Parquet row; meta is a JSON string so that its shape may differ between rows."""
    return {
        "id": sample.id,
        "question": sample.question,
        "answer": sample.answer,
        "answer_type": sample.answer_type,
        "choices": list(sample.choices),
        "precision": sample.precision,
        "images": [bytes(b) for b in sample.images],
        "source": sample.source,
        "meta": json.dumps(sample.meta, sort_keys=True, ensure_ascii=False),
    }


def _opt_int(value: Any) -> Optional[int]:
    # Parquet via pandas / Ray Data turns a null int column into float NaN.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def from_row(row: dict[str, Any]) -> Sample:
    """Inverse of to_row; also accepts rows from pandas / Ray Data (numpy arrays, numpy ints)."""
    meta = row.get("meta") or {}
    if isinstance(meta, (str, bytes)):
        meta = json.loads(meta)
    choices = row.get("choices")
    images = row.get("images")
    return Sample(
        id=str(row["id"]),
        question=str(row["question"]),
        answer=str(row["answer"]),
        answer_type=str(row["answer_type"]),  # type: ignore[arg-type]
        images=[bytes(b) for b in images] if images is not None else [],
        choices=[str(c) for c in choices] if choices is not None else [],
        precision=_opt_int(row.get("precision")),
        source=str(row.get("source") or ""),
        meta=dict(meta),
    )


def write_parquet(samples: Iterable[Sample], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([to_row(s) for s in samples], schema=PARQUET_SCHEMA)
    pq.write_table(table, path)
    return path


def read_parquet(path: str | Path) -> list[Sample]:
    """Our own row format only; readers.read_table handles foreign Parquet and bad rows."""
    return [from_row(r) for r in pq.read_table(path).to_pylist()]


# ---------------------------------------------------------------- images


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to an RGB image; ImageDecodeError on corrupt or huge input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"image must be bytes, got {type(data).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image of {width}x{height} pixels exceeds the limit of {max_pixels}"
                    )
                probe.verify()  # checks structure (e.g. PNG CRCs) without decoding pixels
            image = Image.open(io.BytesIO(data))  # verify() leaves the first object unusable
            image.load()
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels are usually (0,0,0,0): a plain convert("RGB") would turn a chart's
    # transparent background black, under black lines. Composite on white instead.
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pil_images(sample: Sample) -> list[Image.Image]:
    return [decode_image(b) for b in sample.images]


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- prompts


def format_question(sample: Sample) -> str:
    if not sample.choices:
        return sample.question
    options = "\n".join(f"{letter(i)}. {c}" for i, c in enumerate(sample.choices))
    return f"{sample.question}\n{options}"


def build_messages(sample: Sample, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """HF chat messages in Qwen2.5-VL form, the one prompt of SFT, RL, eval and ``avar vas``.
    No system turn when system_prompt is None, so that the chat template inserts its default
    system prompt (which counts as span S)."""
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    text = f"{format_question(sample)}\n{DEFAULT_INSTRUCTION}"
    messages.append({"role": "user", "content": user_content(text, len(sample.images), sample.id)})
    return messages


IMAGE_PLACEHOLDER = "<image>"  # EasyR1/verl prompts mark where each image stands


def user_content(text: str, num_images: int, sample_id: str = "") -> list[dict[str, Any]]:
    """The user turn's parts: an image part at each ``<image>`` of ``text`` (as many as there are
    images), or, with no placeholder, every image before the text (this project's own rows)."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        return [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    if len(pieces) - 1 != num_images:
        raise ValueError(f"sample {sample_id!r}: {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders in the prompt "
                         f"for {num_images} images")
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content
