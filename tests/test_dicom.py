"""runtime/dicom/ on the files shipped inside pydicom: CT windows equal the recipe written
out in plain numpy, compressed variants equal (lossless) or approach (lossy) the uncompressed
image, MONOCHROME1 comes out inverted, and broken files give one actionable line."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, apply_rescale, pixel_array

from medgemma_edge.runtime.dicom import load_dicom
from medgemma_edge.runtime.dicom.windows import PRESETS, describe_presets, parse_window
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.picture import Picture
from medgemma_edge.runtime.sources import load_pictures
from tests.dicom_helpers import (assert_close, assert_same, image_dataset, rewrite, save,
                                 shipped)


def only(pictures: list[Picture]) -> np.ndarray:
    assert len(pictures) == 1 and pictures[0].label is None
    px = pictures[0].pixels
    assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[2] == 3
    return px


def gray(pictures: list[Picture]) -> np.ndarray:
    px = only(pictures)
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 0] == px[..., 2]).all(), "not gray"
    return px[..., 0]


# ---------------------------------------------------------------------------------------------
# CT: the recipe, in plain numpy (Google's high_dimensional_ct notebook)

def recipe_ct(path: str, windows) -> np.ndarray:
    ds = pydicom.dcmread(path)
    hu = apply_rescale(ds.pixel_array, ds)
    channels = []
    for lo, hi in windows:
        x = np.clip(hu, lo, hi).astype(np.float32)
        x -= lo
        x /= (hi - lo)
        x *= 255.0
        channels.append(np.round(x, 0).astype(np.uint8))
    return np.stack(channels, axis=-1)


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_ct_default_windows_equal_the_recipe(name):
    want = recipe_ct(shipped(name), [(-1024, 1024), (-135, 215), (0, 80)])
    assert_same(only(load_dicom(shipped(name))), want, f"{name} default windows")


@pytest.mark.parametrize("window", ["medgemma-1.0", "lung", "BONE", "-1000:500,-100:100,20:60",
                                    "-160:240"])
def test_ct_chosen_windows_equal_the_recipe(window):
    want = recipe_ct(shipped("CT_small.dcm"), parse_window(window))
    assert_same(only(load_dicom(shipped("CT_small.dcm"), window=window)), want, window)


def test_window_presets_and_parsing():
    assert parse_window(None) == parse_window("") == ((-1024, 1024), (-135, 215), (0, 80))
    assert parse_window("medgemma-1.0")[1] == (135, 215)
    assert parse_window(" -1024:1024 , -135:215,0:80 ") == ((-1024, 1024), (-135, 215), (0, 80))
    assert parse_window("-160:240") == ((-160, 240),) * 3
    assert parse_window("lung") == ((-1350, 150),) * 3
    for name in PRESETS:
        assert name in describe_presets()
    for bad in ["nope", "1:2,3:4", "10:5", "a:b", "1:2:3", "nan:5", "-inf:0"]:
        with pytest.raises(InputError) as err:
            parse_window(bad)
        assert " — " in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# MR: min-max; every lossless encoding of MR_small gives the same pixels

def test_mr_is_min_max_scaled():
    v = pydicom.dcmread(shipped("MR_small.dcm")).pixel_array.astype(np.float64)
    want = np.round((v - v.min()) / (v.max() - v.min()) * 255.0).astype(np.uint8)
    assert_same(gray(load_dicom(shipped("MR_small.dcm"))), want, "MR_small min-max")


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_expb.dcm", "MR_small_implicit.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_padded.dcm"])
def test_lossless_variants_equal_the_uncompressed_image(name):
    want = only(load_dicom(shipped("MR_small.dcm")))
    assert_same(only(load_dicom(shipped(name))), want, name)


# ---------------------------------------------------------------------------------------------
# Colour: RGB, YBR, palette, 16/32-bit, lossless and lossy codecs against the uncompressed RGB

def jpeg_ls_near(name: str) -> int:
    """NEAR from the first JPEG-LS scan header: the codec's own bound on the error."""
    ds = pydicom.dcmread(shipped(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    sos = frame.find(b"\xff\xda")
    components = frame[sos + 4]
    return frame[sos + 5 + 2 * components]


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm",
                                  "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"])
def test_lossless_colour_equals_rgb(name):
    want = only(load_dicom(shipped("SC_rgb_rle.dcm")))
    assert_same(only(load_dicom(shipped(name))), want, name)
    assert (want == pixel_array(shipped("SC_rgb_rle.dcm"))).all()


@pytest.mark.parametrize("name", ["SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm"])
def test_jpeg_ls_near_lossless_stays_within_near(name):
    near = jpeg_ls_near(name)
    assert near > 0
    assert_close(only(load_dicom(shipped(name))), only(load_dicom(shipped("SC_rgb_rle.dcm"))),
                 name, max_abs=near)


# JPEG baseline has no error bound; these floors sit ~1 dB under what the encoder's quality
# gave, so a colour-space mistake (YBR read as RGB: ~10 dB) fails loudly.
LOSSY = [
    ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", 55.0),
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_rle.dcm", 27.0),
    ("SC_rgb_dcmtk_+eb+cy+n2.dcm", "SC_rgb_rle.dcm", 45.0),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_rle.dcm", 27.0),
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_rle.dcm", 45.0),
    ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "SC_rgb_rle.dcm", 45.0),
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 45.0),
    ("SC_rgb_jpeg_lossy_gdcm.dcm", "SC_rgb_rle.dcm", 27.0),
    ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle.dcm", 45.0),  # 4:2:2 chroma, no codec
    ("SC_rgb_jpeg.dcm", "SC_rgb_jpeg_dcmd.dcm", 70.0),
    ("SC_jpeg_no_color_transform.dcm", "SC_rgb_jpeg_dcmd.dcm", 70.0),
    ("SC_jpeg_no_color_transform_2.dcm", "SC_rgb_jpeg_dcmd.dcm", 39.0),
    ("SC_rgb_jpeg_app14_dcmd.dcm", "SC_rgb_jpeg_dcmd.dcm", 39.0),
    ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 40.0),
]


@pytest.mark.parametrize("name,reference,min_psnr", LOSSY)
def test_lossy_and_ybr_colour_close_to_rgb(name, reference, min_psnr):
    assert_close(only(load_dicom(shipped(name))), only(load_dicom(shipped(reference))),
                 f"{name} vs {reference}", min_psnr=min_psnr)


def test_palette_colour_is_expanded():
    ds = pydicom.dcmread(shipped("examples_palette.dcm"))
    want = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    assert_same(only(load_dicom(shipped("examples_palette.dcm"))), want, "palette")


def test_multi_frame_colour_gives_labelled_frames():
    pics = load_dicom(shipped("SC_rgb_rle_2frame.dcm"))
    assert [p.label for p in pics] == ["SLICE 1", "SLICE 2"]
    frames = pixel_array(shipped("SC_rgb_rle_2frame.dcm"))
    for i, p in enumerate(pics):
        assert_same(p.pixels, frames[i], f"frame {i}")


def test_multi_frame_ybr_keeps_frames_by_the_formula():
    frames = pixel_array(shipped("examples_ybr_color.dcm"))  # (30, H, W, 3) RGB
    pics = load_dicom(shipped("examples_ybr_color.dcm"), max_slices=7)
    kept = [round(i / 7 * 29) for i in range(1, 8)]
    assert [p.label for p in pics] == [f"SLICE {i}" for i in range(1, 8)]
    for p, k in zip(pics, kept):
        assert_same(p.pixels, frames[k], f"frame {k}")


# ---------------------------------------------------------------------------------------------
# X-ray path: the file's window, full range, MONOCHROME1, 8-bit pass-through

def windowed(v: np.ndarray, center: float, width: float) -> np.ndarray:
    lo, hi = center - width / 2, center + width / 2
    x = (np.clip(v.astype(np.float64), lo, hi) - lo) / (hi - lo) * 255.0
    return np.round(x).astype(np.uint8)


def test_xray_uses_the_window_in_the_file(tmp_path):
    path = rewrite("MR_small.dcm", tmp_path / "dx.dcm", Modality="DX")  # WC 600 / WW 1600
    v = pydicom.dcmread(shipped("MR_small.dcm")).pixel_array
    assert_same(gray(load_dicom(path)), windowed(v, 600, 1600), "DX window 600/1600")


def test_12_bit_xray_without_window_uses_the_full_range():
    v = pydicom.dcmread(shipped("JPGExtended.dcm")).pixel_array.astype(np.float64)
    want = np.round((v - v.min()) / (v.max() - v.min()) * 255.0).astype(np.uint8)
    got = gray(load_dicom(shipped("JPGExtended.dcm")))
    assert_same(got, want, "12-bit full range")
    assert got.min() == 0 and got.max() == 255


def test_8_bit_gray_passes_through():
    want = pydicom.dcmread(shipped("image_dfl.dcm")).pixel_array  # deflate transfer syntax
    assert_same(gray(load_dicom(shipped("image_dfl.dcm"))), want, "8-bit deflated")


def test_monochrome1_comes_out_inverted(tmp_path):
    v = pydicom.dcmread(shipped("MR_small.dcm")).pixel_array.astype(np.int32)
    flipped = (3000 - v).astype(np.int16)  # what a MONOCHROME1 writer stores for the same image
    common = dict(Modality="DX", WindowCenter=None, WindowWidth=None)
    mono1 = rewrite("MR_small.dcm", tmp_path / "m1.dcm", flipped,
                    PhotometricInterpretation="MONOCHROME1", **common)
    same_as_mono2 = rewrite("MR_small.dcm", tmp_path / "m2.dcm", flipped, **common)
    original = rewrite("MR_small.dcm", tmp_path / "orig.dcm", **common)
    got = gray(load_dicom(mono1))
    assert_same(got, 255 - gray(load_dicom(same_as_mono2)), "MONOCHROME1 = 255 - MONOCHROME2")
    # Against the original image only rounding ties (x.5 → even) may differ, by one level.
    assert_close(got, gray(load_dicom(original)), "MONOCHROME1 vs original", max_abs=1)
    windowed_mono1 = rewrite("MR_small.dcm", tmp_path / "m1w.dcm", flipped, Modality="DX",
                             PhotometricInterpretation="MONOCHROME1", WindowCenter=2400,
                             WindowWidth=1600)
    assert_same(gray(load_dicom(windowed_mono1)), 255 - windowed(flipped, 2400, 1600),
                "MONOCHROME1 windowed, then inverted")


# ---------------------------------------------------------------------------------------------
# Other ways in

def test_bytes_stream_and_load_pictures_agree():
    want = only(load_dicom(shipped("CT_small.dcm")))
    with open(shipped("CT_small.dcm"), "rb") as fh:
        data = fh.read()
    assert_same(only(load_dicom(data)), want, "bytes")
    assert_same(only(load_dicom(io.BytesIO(data))), want, "stream")
    assert_same(only(load_pictures(shipped("CT_small.dcm"))), want, "load_pictures")


def test_file_without_preamble_or_meta(tmp_path):
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None
    path = tmp_path / "bare.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    want = only(load_dicom(shipped("MR_small.dcm")))
    assert_same(only(load_dicom(path)), want, "no preamble, no file meta")


# ---------------------------------------------------------------------------------------------
# Broken input: one line, what is wrong — what to do, no patient value, no traceback

BROKEN = {
    "JPEG-lossy.dcm": "cannot decode",  # 12-bit JPEG with a bad scan header (see pydicom README)
    # its codestream declares another size than Rows/Columns: refused before the decoder runs
    "JPEG2000-embedded-sequence-delimiter.dcm": "the compressed frame declares",
    "MR_truncated.dcm": "truncated",
    "rtplan.dcm": "holds no image", "rtplan_truncated.dcm": "the file is truncated",
    "rtstruct.dcm": "holds no image", "reportsi.dcm": "holds no image",
    "test-SR.dcm": "holds no image", "waveform_ecg.dcm": "holds no image",
    "ExplVR_BigEndNoMeta.dcm": "holds no image", "empty_charset_LEI.dcm": "holds no image",
    # image classes without pixel data: cut before them, or stripped
    "UN_sequence.dcm": "ends before its pixel data", "priv_SQ.dcm": "ends before its pixel data",
    "rtdose.dcm": "RT dose", "rtdose_rle.dcm": "RT dose", "badVR.dcm": "RT dose",
    "liver_1frame.dcm": "segmentation", "nested_priv_SQ.dcm": "header is damaged",
    "meta_missing_tsyntax.dcm": "header is damaged", "no_meta.dcm": "not a DICOM file",
}
_IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                "OtherPatientIDs", "InstitutionName", "ReferringPhysicianName",
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyID")


def identifying_values(path) -> list[str]:
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:
        return []
    values = []
    for keyword in _IDENTIFYING:
        try:
            value = str(ds.get(keyword, "") or "").strip()
        except Exception:
            continue
        if len(value) >= 4:
            values.append(value)
    return values


def refusal(src, **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        load_dicom(src, **kwargs)
    err = caught.value
    message = str(err)
    assert "\n" not in message and " — " in message, f"not one actionable line: {message!r}"
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), \
        "the pydicom exception (which may quote values) is chained to the error"
    return message


@pytest.mark.parametrize("name,expected", sorted(BROKEN.items()))
def test_broken_files_give_one_actionable_line(name, expected):
    message = refusal(shipped(name))
    assert expected in message, message
    for value in identifying_values(shipped(name)):
        assert value not in message, f"{name}: message quotes a patient/study value"


def nframes_bad_vr(tmp_path):
    ds = image_dataset(np.zeros((2, 4, 4), np.int16), frames=2)
    ds.NumberOfFrames = "100000000002"  # IS, 12 characters: overwritten below with bad text
    data = save(ds, tmp_path / "ok.dcm").read_bytes().replace(b"100000000002", b"QZXFRAMES002")
    (tmp_path / "badvr.dcm").write_bytes(data)
    return tmp_path / "badvr.dcm"


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_bad_vr_names_the_tag_not_the_value(tmp_path):
    path = nframes_bad_vr(tmp_path)
    with pytest.raises(ValueError, match="QZXFRAMES"):  # pydicom's own message quotes it
        int(pydicom.dcmread(path).NumberOfFrames)
    message = refusal(path)
    assert "NumberOfFrames" in message and "QZX" not in message


def test_bad_inputs_and_options(tmp_path):
    assert "no such file" in refusal(tmp_path / "missing.dcm")
    (tmp_path / "empty").mkdir()
    assert "empty" in refusal(tmp_path / "empty")
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    assert "not a DICOM file" in refusal([str(tmp_path / "photo.png")])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not dicom")
    assert "no DICOM images" in refusal(tmp_path / "junk")
    assert "CT windows" in refusal(shipped("MR_small.dcm"), window="lung")
    assert "unknown CT window preset" in refusal(shipped("CT_small.dcm"), window="lungs")
    for bad in (0, -3, True, "5", 2.5):
        assert "max_slices" in refusal(shipped("CT_small.dcm"), max_slices=bad)
    assert "cannot read DICOM from" in refusal(12345)
    assert "binary mode" in refusal(io.StringIO("DICM"))


@pytest.mark.parametrize("change", ["photometric", "no_pixels", "samples", "huge", "short",
                                    "transfer_syntax", "frames"])
def test_damaged_headers_are_refused(tmp_path, change):
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    if change == "photometric":
        ds.PhotometricInterpretation = "HSV"
    elif change == "no_pixels":
        del ds.PixelData
    elif change == "samples":
        ds.SamplesPerPixel = 3
    elif change == "huge":
        ds.Rows = ds.Columns = 65535
        ds.NumberOfFrames = 1
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
    elif change == "short":
        ds.PixelData = ds.PixelData[:100]
    elif change == "transfer_syntax":
        ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    elif change == "frames":  # claims 10⁸ frames, holds one: must fail fast, not list them all
        ds.NumberOfFrames = 99999999
    path = tmp_path / f"{change}.dcm"
    ds.save_as(path)
    start = time.perf_counter()
    refusal(path)
    assert time.perf_counter() - start < 2.0


def test_dicom_package_never_imports_sources_and_presets_load_without_pydicom():
    """No import cycle: runtime/sources.py dispatches to the DICOM package, never the reverse.
    And the preset names `--help` lists come without pydicom's ~0.2 s import."""
    code = ("import sys; import medgemma_edge.runtime.dicom.windows as w; "
            "assert 'pydicom' not in sys.modules, 'windows.py pulled in pydicom'; "
            "import medgemma_edge.runtime.dicom.convert; "
            "assert 'medgemma_edge.runtime.sources' not in sys.modules, 'dicom imports sources'; "
            "print(','.join(w.PRESET_NAMES))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == ",".join(PRESETS)
