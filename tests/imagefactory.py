"""Tiny test images made with PIL, awkward files, and reading shards back with plain webdataset.

Owned by the packing tests; independent of gastro_dist.data.synth on purpose.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(size: tuple[int, int] = (96, 72), seed: int = 0) -> Image.Image:
    """Smooth random colour blobs: distinct bytes per seed, small JPEGs."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)


def save_image(path: Path, size: tuple[int, int] = (96, 72), seed: int = 0, img: Image.Image | None = None,
               **save_options) -> Path:
    """Write `img` (default: noise of `size`) to `path`, format from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
    (img or noise_image(size, seed)).save(path, format=image_format[path.suffix.lower()], **save_options)
    return path


def make_class_tree(root: Path, images_per_class: dict[str, int], seed: int = 0) -> list[Path]:
    """`root/<class>/img<i>.jpg` with every third image in a nested sub-folder and upper-case extension."""
    paths = []
    for class_number, (cls, num_images) in enumerate(images_per_class.items()):
        for i in range(num_images):
            name = f"sub/deeper/img{i}.JPG" if i % 3 == 0 else f"img{i}.jpg"
            paths.append(save_image(root / cls / name, seed=seed * 10_000 + class_number * 1000 + i))
    return paths


def jpeg_bytes(size: tuple[int, int] = (128, 96), seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    noise_image(size, seed).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def truncated_jpeg_bytes() -> bytes:
    data = jpeg_bytes(seed=99)
    return data[: len(data) * 6 // 10]


def png_header_only(width_px: int, height_px: int) -> bytes:
    """A valid PNG header declaring a huge RGB image with almost no data: a cheap decompression bomb."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    header = struct.pack(">IIBBBBB", width_px, height_px, 8, 2, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def read_split(out_dir: Path, split: str) -> list[dict]:
    """Every sample of a split read with plain webdataset: {key, img (PIL RGB), cls (int), meta (dict)}."""
    import webdataset as wds

    urls = sorted(str(path) for path in out_dir.glob(f"{split}-*.tar"))
    if not urls:
        return []
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls", "json")
    return [{"key": key, "img": img, "cls": int(cls), "meta": meta} for key, img, cls, meta in dataset]


def read_index(out_dir: Path) -> dict:
    return json.loads((out_dir / "index.json").read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
