"""Generated picture files for the image-path tests: every format and Pillow mode a clinic file
can have, odd sizes, EXIF orientations. Deterministic (seeded), written under a tmp dir."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def smooth_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: gradients plus noise, so every channel, edge and level is exercised."""
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)
    base = np.stack([
        127 + 100 * np.outer(np.cos(y / (5 + seed % 5) - c), np.sin(x / (3 + seed % 7) + c))
        for c in range(3)
    ], axis=-1)  # (H, W, 3), separable so that large cases stay cheap
    noisy = base + rng.integers(-40, 41, base.shape, dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def xray_u16(width: int, height: int, seed: int, bits: int = 12) -> np.ndarray:
    """(H, W) uint16 using `bits` of range, not starting at 0 (detector offset)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    body = np.exp(-(((x - width / 2) / (0.35 * width)) ** 2 + ((y - height / 2) / (0.4 * height)) ** 2))
    top = (1 << bits) - 1
    values = 200 + body * (top - 400) + rng.normal(0, 30, body.shape)
    return np.clip(values, 0, top).astype(np.uint16)


def in_mode(rgb: np.ndarray, mode: str) -> Image.Image:
    """An RGB array converted into a PIL image of `mode`, the way real files get such modes."""
    image = Image.fromarray(rgb)
    if mode == "P":
        return image.quantize(colors=200, method=Image.Quantize.FASTOCTREE)
    if mode == "P+transparency":
        pal = image.quantize(colors=64, method=Image.Quantize.FASTOCTREE)
        pal.info["transparency"] = 3
        return pal
    if mode == "PA":
        pal = image.quantize(colors=64, method=Image.Quantize.FASTOCTREE).convert("PA")
        pal.putalpha(Image.fromarray(rgb[:, :, 0]))
        return pal
    if mode in ("RGBA", "LA"):
        base = image.convert(mode[:-1])
        base.putalpha(Image.fromarray(rgb[:, :, 2]))
        return base
    return image.convert(mode)


def save(image: Image.Image, path: Path, fmt: str, orientation: int | None = None) -> Path:
    kwargs = {}
    if fmt == "WEBP":
        kwargs.update(lossless=True, method=0)
    if fmt == "JPEG":
        kwargs["quality"] = 90
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, fmt, **kwargs)
    return path


# (mode, format, orientation or None): every 8-bit mode, each in formats that can hold it.
EIGHT_BIT_CASES = [
    ("1", "PNG", None), ("1", "BMP", None), ("1", "TIFF", None),
    ("L", "PNG", None), ("L", "JPEG", None), ("L", "BMP", None), ("L", "TIFF", None),
    ("LA", "PNG", None), ("LA", "TIFF", None),
    ("P", "PNG", None), ("P", "BMP", None), ("P", "TIFF", None), ("P+transparency", "PNG", None),
    ("PA", "TIFF", None),
    ("RGB", "PNG", None), ("RGB", "JPEG", None), ("RGB", "BMP", None), ("RGB", "TIFF", None),
    ("RGB", "WEBP", None),
    ("RGBA", "PNG", None), ("RGBA", "TIFF", None), ("RGBA", "WEBP", None),
    ("CMYK", "JPEG", None), ("CMYK", "TIFF", None), ("YCbCr", "TIFF", None),
    # EXIF orientations 2..8 (mirror, rotate 180, mirror + rotate, 90, ...), as phones write them.
    ("RGB", "JPEG", 2), ("RGB", "JPEG", 3), ("RGB", "JPEG", 4), ("RGB", "JPEG", 5),
    ("RGB", "JPEG", 6), ("RGB", "JPEG", 7), ("RGB", "JPEG", 8),
    ("L", "JPEG", 6), ("L", "PNG", 8), ("RGBA", "PNG", 5), ("RGB", "WEBP", 6), ("L", "TIFF", 3),
]

# Odd sizes (width, height): upscales, downscales, slivers, the model size itself and near it;
# most with an odd width - height, so 'pad' must split an odd margin the way Google's code does.
ODD_SIZES = [(37, 24), (101, 58), (639, 480), (5, 3), (1, 9), (9, 1), (1283, 765), (896, 896),
             (895, 898), (411, 1202), (2049, 1531), (300, 1)]


def eight_bit_files(folder: Path) -> list[tuple[str, Path]]:
    """(description, path) for every 8-bit case, each at a different odd size."""
    out = []
    for i, (mode, fmt, orientation) in enumerate(EIGHT_BIT_CASES):
        w, h = ODD_SIZES[i % len(ODD_SIZES)]
        image = in_mode(smooth_rgb(w, h, seed=i), mode)
        ext = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
        path = save(image, folder / f"case{i:02d}.{ext}", fmt, orientation)
        tag = f" exif={orientation}" if orientation else ""
        out.append((f"{mode} {fmt} {w}x{h}{tag}", path))
    return out


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking 8-bit gray PNG that claims width x height but carries almost no data:
    the shape of a decompression bomb, without the memory cost of making a real one."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))
