"""Not a way to run the model: the cost of only decoding each input file, with the decoders the
runtime itself uses (Pillow for PNG, pydicom for DICOM). Every preprocessing pays it and none can
cut it, so HF time / this time is the best preprocessing speed-up any implementation could reach."""

from __future__ import annotations

from pathlib import Path

from benchmarks.backends import Backend


def decode_png(path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        im.load()


def decode_dicom(paths) -> None:
    import pydicom

    for p in paths:
        pydicom.dcmread(p).pixel_array


def decoder(kind: str, path):
    """A zero-argument function that decodes the input of `kind` at `path` (None: unknown kind)."""
    if kind == "png":
        return lambda: decode_png(path)
    if kind == "dicom16":
        return lambda: decode_dicom([path])
    if kind == "ct_series":
        files = sorted(Path(path).glob("*.dcm"))
        return lambda: decode_dicom(files)
    return None


class FloorBackend(Backend):
    def preprocess(self, kind: str, path: str):
        return decoder(kind, path)
