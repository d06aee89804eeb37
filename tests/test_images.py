"""runtime.images: every source type, 8-bit parity with Pillow's convert("RGB"), the 16-bit/float
full-range mapping against plain numpy, and every refusal (one InputError line, no traceback)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from medgemma_edge.runtime import images
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.images import MAX_PIXELS, load_image
from tests.imagegen import eight_bit_files, png_header_only, save, smooth_rgb, xray_u16


def _plain_full_range(values: np.ndarray) -> np.ndarray:
    """The documented mapping, written out: min -> 0, max -> 255, round half up."""
    v = values.astype(np.float64)
    lo, hi = v.min(), v.max()
    return np.floor((v - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)


def _worst(a, b) -> str:
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return f"max|d| = {d.max()}, {(d > 0).sum()} pixels differ"


# --- 8-bit: exactly transformers' load_image (exif_transpose, then convert("RGB")) ------------

def test_eight_bit_files_equal_pillow_convert_rgb(tmp_path):
    worst = (0, "")
    for desc, path in eight_bit_files(tmp_path):
        with Image.open(path) as im:
            expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        got = load_image(path)
        assert got.shape == expected.shape and got.dtype == np.uint8, desc
        d = int(np.abs(got.astype(int) - expected).max())
        worst = max(worst, (d, desc))
    assert worst[0] == 0, f"worst: {worst[1]}: max|d| = {worst[0]}"


def test_exif_orientation_is_applied(tmp_path):
    rgb = smooth_rgb(40, 20, seed=1)
    path = save(Image.fromarray(rgb), tmp_path / "rot.png", "PNG", orientation=6)  # 90 deg clockwise
    got = load_image(path)
    assert got.shape == (40, 20, 3)
    assert np.array_equal(got, np.rot90(rgb, k=-1))


def test_gray_pictures_come_back_as_one_plane_view(tmp_path):
    gray = smooth_rgb(30, 20, seed=2)[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    got = load_image(tmp_path / "g.png")
    assert got.shape == (20, 30, 3) and got.strides[2] == 0
    assert np.array_equal(got[:, :, 2], gray)


def test_sources_path_bytes_pil_array_agree(tmp_path):
    rgb = smooth_rgb(33, 17, seed=3)
    path = tmp_path / "p.png"
    Image.fromarray(rgb).save(path)
    from_path = load_image(path)
    assert np.array_equal(from_path, rgb)
    assert np.array_equal(load_image(str(path)), rgb)
    assert np.array_equal(load_image(path.read_bytes()), rgb)
    assert np.array_equal(load_image(bytearray(path.read_bytes())), rgb)
    assert np.array_equal(load_image(Image.open(path)), rgb)
    assert np.array_equal(load_image(rgb), rgb)


def test_arrays_of_every_layout():
    rgb = smooth_rgb(9, 7, seed=4)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 17, np.uint8)])
    assert np.array_equal(load_image(rgba), rgb)  # alpha dropped, as convert("RGB") does
    assert np.array_equal(load_image(rgb[:, :, :1])[:, :, 1], rgb[:, :, 0])
    mask = rgb[:, :, 0] > 128
    assert set(np.unique(load_image(mask))) <= {0, 255}
    assert np.array_equal(load_image(Image.fromarray(mask)), load_image(mask))


# --- 16-bit and float: full range, not transformers' clip at 255 ----------------------------

@pytest.mark.parametrize("fmt,dtype", [("PNG", "uint16"), ("TIFF", "uint16"), ("TIFF", ">u2"),
                                       ("TIFF", "int32"), ("TIFF", "float32")])
def test_high_depth_file_maps_full_range(tmp_path, fmt, dtype):
    values = xray_u16(211, 157, seed=7).astype(dtype)
    if dtype == "float32":
        values = values * np.float32(0.01) - np.float32(3.5)
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(values.astype(values.dtype.newbyteorder("="))).save(path, fmt)
    with Image.open(path) as im:
        assert im.mode in images.HIGH_DEPTH_MODES, im.mode
    got = load_image(path)
    expected = _plain_full_range(values)
    assert got.shape == (157, 211, 3)
    assert np.array_equal(got[:, :, 0], expected), _worst(got[:, :, 0], expected)
    assert got.min() == 0 and got.max() == 255


def test_twelve_bit_xray_is_not_whited_out(tmp_path):
    values = xray_u16(64, 64, seed=8, bits=12)
    Image.fromarray(values).save(tmp_path / "x.png")
    ours = load_image(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        pillow = np.asarray(im.convert("RGB"))  # what transformers' load_image gives
    assert (pillow == 255).mean() > 0.8  # the reason for the deliberate difference
    assert (ours == 255).mean() < 0.01


def test_high_depth_arrays_and_exif(tmp_path):
    values = xray_u16(50, 30, seed=9)
    assert np.array_equal(load_image(values)[:, :, 0], _plain_full_range(values))
    floats = np.linspace(-1, 1, 60, dtype=np.float64).reshape(6, 10)
    assert np.array_equal(load_image(floats)[:, :, 0], _plain_full_range(floats))
    image = Image.fromarray(values)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 counter-clockwise
    image.save(tmp_path / "r.tif", "TIFF", exif=exif)
    got = load_image(tmp_path / "r.tif")
    assert np.array_equal(got[:, :, 0], np.rot90(_plain_full_range(values)))


# --- refusals --------------------------------------------------------------------------------

def _refused(src, *fragments):
    with pytest.raises(InputError) as info:
        load_image(src)
    message = str(info.value)
    assert "\n" not in message and " — " in message, message  # one line: what is wrong — what to do
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_refuses_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture at all")
    _refused(tmp_path / "notes.png", "not a picture")
    _refused(b"\x00" * 100, "not a picture")


def test_refuses_truncated_files(tmp_path):
    for fmt in ("PNG", "JPEG", "TIFF"):
        full = io.BytesIO()
        Image.fromarray(smooth_rgb(300, 200, seed=10)).save(full, fmt)
        data = full.getvalue()
        (tmp_path / "cut").write_bytes(data[: len(data) * 2 // 3] if fmt != "TIFF" else data[: len(data) // 2])
        _refused(tmp_path / "cut")


def test_refuses_unsupported_mode_and_format(tmp_path):
    Image.new("LAB", (8, 8)).save(tmp_path / "lab.tif")
    _refused(tmp_path / "lab.tif", "'LAB'", "not supported")
    _refused(Image.new("HSV", (8, 8)), "'HSV'")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.gif")
    _refused(tmp_path / "a.gif", "GIF", "not supported")


def test_refuses_decompression_bombs(tmp_path, monkeypatch):
    # Between Pillow's limit and twice it Pillow only warns: we make that an error.
    warn_size = png_header_only(10_000, 10_000)  # 100 M pixels
    _refused(warn_size, "decompression bomb", f"{Image.MAX_IMAGE_PIXELS:,}")
    _refused(png_header_only(20_000, 20_000), "decompression bomb")  # Pillow's own error
    # Our limit holds even when something in the process switched Pillow's off.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    _refused(warn_size, f"{MAX_PIXELS:,}-pixel limit")
    # And a stricter Pillow limit is obeyed and named.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("L", (40, 40)).save(buf, "PNG")
    _refused(buf.getvalue(), "1,000")


def test_refuses_missing_file_and_bad_arrays(tmp_path):
    _refused(tmp_path / "nope.png", "no such file")
    _refused(np.zeros((4, 4, 5), np.uint8), "shape")
    _refused(np.zeros((0, 4), np.uint8), "empty")
    _refused(np.zeros((4, 4), np.complex64), "complex64")
    _refused(3.14, "float")


# --- orientation from PNG metadata: Pillow reads eXIf, and XMP text chunks too ----------------

def test_png_orientation_from_exif_and_xmp_is_applied(tmp_path):
    from PIL import PngImagePlugin

    rgb = smooth_rgb(333, 211, seed=4)
    exif = save(Image.fromarray(rgb), tmp_path / "exif.png", "PNG", orientation=6)
    assert np.array_equal(load_image(exif), np.rot90(rgb, k=-1))
    # Pillow also rotates by an XMP tiff:Orientation, even in a chunk after the pixels
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
           'syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
           '</rdf:RDF></x:xmpmeta>')
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp, zip=True)
    path = tmp_path / "xmp.png"
    Image.fromarray(rgb).save(path, "PNG", pnginfo=info)
    got = load_image(path)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert got.shape == (333, 211, 3), f"Pillow did not rotate by XMP here: {got.shape}"
    assert np.array_equal(got, want), _worst(got, want)
