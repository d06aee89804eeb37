"""Not a way to run the model: the cost of only decoding each input file (the fastest PNG decoder
installed: libspng through pyspng, else Pillow; pydicom for DICOM), which every preprocessing pays
and none can cut. HF time / this time is the best preprocessing speed-up any implementation
could reach."""

from __future__ import annotations

from pathlib import Path

from benchmarks.backends import Backend


def _decode_png(path: str) -> None:
    try:
        import pyspng
    except ImportError:
        pyspng = None
    if pyspng is not None:
        with open(path, "rb") as fh:
            pyspng.load(fh.read())
        return
    from PIL import Image

    with Image.open(path) as im:
        im.load()


def _decode_dicom(paths) -> None:
    import pydicom

    for p in paths:
        pydicom.dcmread(p).pixel_array


class FloorBackend(Backend):
    def preprocess(self, kind: str, path: str):
        if kind == "png":
            return lambda: _decode_png(path)
        if kind == "dicom16":
            return lambda: _decode_dicom([path])
        if kind == "ct_series":
            files = sorted(Path(path).glob("*.dcm"))
            return lambda: _decode_dicom(files)
        return None
