"""Data layer: the Sample schema, benchmark readers and procedural visual tasks."""

from avar_ray.data.schema import (
    DEFAULT_INSTRUCTION,
    Sample,
    build_messages,
    decode_image,
    format_question,
    from_row,
    pil_images,
    read_parquet,
    to_row,
    write_parquet,
)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "Sample",
    "build_messages",
    "decode_image",
    "format_question",
    "from_row",
    "pil_images",
    "read_parquet",
    "to_row",
    "write_parquet",
]
