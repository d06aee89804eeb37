"""Whole-slide images (runtime/wsi): the level, the tissue grid, the sample and every patch's
pixels are checked against references written here from the notebook's rules (numpy, OpenSlide's
own read_region), not against the code under test; the prompt's layout through `ask`'s render;
a 100,000 × 100,000 slide under a memory bound.

Slides are built by tests/wsi_helpers.py. The main one ("40X"): level 0 at 0.25 µm/px (a
constant, never looked at), level 1 at 1.0 µm/px holding the tissue (downsample 4: 10X, the
patch level), level 2 at 4.0 (16) and level 3 at 16.0 (64) µm/px, block means of level 1.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import openslide
import pytest
from click.testing import CliRunner
from PIL import Image

from medgemma_edge.cli import main
from medgemma_edge.runtime.chat_template import ChatTemplate
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.runtime.wsi import SEED, plan_slide, slide_path
from tests.wsi_helpers import (TISSUE_PINK, aperio_description, block_mean, patch_level_image, write_dicom_wsi,
                               write_tiff_slide)

W1, H1 = 5504, 3776  # level 1: 6 x 4 whole strides of 896, remainders 128 and 192 dropped
QUESTION = "Describe these patches."


def _slide(path, app_mag=40, mpp=0.25, description=True):
    level1 = patch_level_image(W1, H1)
    levels = [(W1 * 4, H1 * 4, (255, 255, 255)), level1, block_mean(level1, 4), block_mean(level1, 16)]
    text = aperio_description(W1 * 4, H1 * 4, app_mag, mpp) if description else None
    return write_tiff_slide(path, levels, text)


@pytest.fixture(scope="module")
def slide40x(tmp_path_factory):
    return str(_slide(tmp_path_factory.mktemp("wsi") / "forty.svs"))


def _reference_grid(path, level, mask_level, stride_at_mask):
    """Mean grey per whole stride, the notebook's way, from the mask level read whole."""
    s = openslide.OpenSlide(path)
    rows, cols = (d // 896 for d in reversed(s.level_dimensions[level]))
    rgba = np.asarray(s.read_region((0, 0), mask_level, s.level_dimensions[mask_level]))
    assert (rgba[..., 3] == 255).all()
    grey = rgba[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    crop = grey[:rows * stride_at_mask, :cols * stride_at_mask]
    means = crop.reshape(rows, stride_at_mask, cols, stride_at_mask).mean(axis=(1, 3))
    tissue = [(r, c) for r in range(rows) for c in range(cols) if 1 <= means[r, c] <= 204]
    return means, tissue


def test_level_nearest_10x_and_mask_level(slide40x):
    plan = plan_slide(slide40x)
    mpps = [0.25 * d for d in openslide.OpenSlide(slide40x).level_downsamples]
    print(plan.describe(), "level µm/px:", mpps)
    assert mpps == [0.25, 1.0, 4.0, 16.0]
    assert plan.level.index == 1 and plan.level.mpp == 1.0 and plan.level.magnification == 10
    assert plan.level.source == "openslide.mpp-x" and plan.mask_level == 2  # 4 µm/px: nearest 8 (16 ties; finer wins)
    assert plan.grid == (H1 // 896, W1 // 896) == (4, 6)


def test_level_from_objective_power_or_given(tmp_path):
    power_only = str(_slide(tmp_path / "power.svs", app_mag=40, mpp=None))
    plan = plan_slide(power_only)
    print(plan.describe())
    assert (plan.level.index, plan.level.source, plan.level.mpp) == (1, "openslide.objective-power", 1.0)
    bare = str(_slide(tmp_path / "bare.tif", description=False))
    assert openslide.OpenSlide(bare).properties.get("openslide.vendor") == "generic-tiff"
    with pytest.raises(InputError, match="--level") as err:
        plan_slide(bare)
    print(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert plan_slide(bare, level=1).tissue == plan.tissue
    with pytest.raises(InputError, match="levels 0 to 3"):
        plan_slide(bare, level=4)


def test_tissue_grid_equals_reference(slide40x):
    plan = plan_slide(slide40x)
    means, tissue = _reference_grid(slide40x, 1, 2, 896 // 4)
    worst = np.nanmax(np.abs(plan.means - means))
    print(f"tissue {tissue}; worst mean-grey difference {worst:.3f} (ours: OpenCV's rounded uint8 grey)")
    assert worst <= 0.5
    assert plan.tissue == tissue
    assert (0, 5) not in tissue and (2, 5) not in tissue  # black, pale
    assert (0, 0) in tissue and (3, 5) in tissue


def test_sample_equals_seeded_random_sample(slide40x):
    _, tissue = _reference_grid(slide40x, 1, 2, 896 // 4)
    for count in (1, 5, len(tissue) - 1):
        expected = sorted(random.Random(SEED).sample(tissue, count))
        got = plan_slide(slide40x, max_slices=count).sampled
        print(count, got)
        assert got == expected
    assert plan_slide(slide40x, max_slices=500).sampled == tissue  # fewer tissue patches than the cap: all


def test_patches_equal_read_region(slide40x):
    plan = plan_slide(slide40x, max_slices=5)
    pictures = load_pictures(slide40x, max_slices=5)
    truth = patch_level_image(W1, H1)
    s = openslide.OpenSlide(slide40x)
    worst = 0
    assert len(pictures) == 5
    for (row, col), picture in zip(plan.sampled, pictures):
        region = np.asarray(s.read_region((col * 896 * 4, row * 896 * 4), 1, (896, 896)))
        assert (region[..., 3] == 255).all() and picture.label is None
        worst = max(worst, int(np.abs(picture.pixels.astype(int) - region[..., :3]).max()))
        assert np.array_equal(picture.pixels, truth[row * 896:(row + 1) * 896, col * 896:(col + 1) * 896])
    print(f"worst difference against read_region: {worst}")
    assert worst == 0


def test_dicom_wsi_file_and_folder(tmp_path):
    from pydicom.data import get_testdata_file

    level0 = patch_level_image(2000, 1900, seed=2)
    paths = write_dicom_wsi(tmp_path / "wsi", [level0, block_mean(level0, 4)], mpp=1.0)
    assert openslide.OpenSlide.detect_format(str(paths[0])) == "dicom"
    plan = plan_slide(str(tmp_path / "wsi"))
    print(plan.describe())
    assert (plan.level.index, plan.level.mpp, plan.mask_level, plan.grid) == (0, 1.0, 1, (2, 2))
    means, tissue = _reference_grid(str(paths[0]), 0, 1, 896 // 4)
    print(f"worst mean-grey difference {np.nanmax(np.abs(plan.means - means)):.3f}")
    assert plan.tissue == tissue and np.nanmax(np.abs(plan.means - means)) <= 0.5
    from_folder, from_file = load_pictures(str(tmp_path / "wsi")), load_pictures(str(paths[1]))
    assert len(from_folder) == len(from_file) == len(tissue)
    for (row, col), a, b in zip(tissue, from_folder, from_file):
        ref = level0[row * 896:(row + 1) * 896, col * 896:(col + 1) * 896]
        assert np.array_equal(a.pixels, ref) and np.array_equal(b.pixels, ref)
    ct = get_testdata_file("CT_small.dcm")
    assert slide_path(ct) is None and load_pictures(ct)[0].pixels.ndim == 3  # X-ray/CT path unchanged


@pytest.fixture(scope="module")
def known_levels():
    level0 = patch_level_image(5376, 1792, seed=3)  # 2 x 6 strides: tissue, glass, black (0, 5)
    return level0, block_mean(level0, 4)


@pytest.mark.parametrize("jpeg2000", [False, True], ids=["uncompressed", "jpeg2000-lossless"])
def test_dicom_wsi_written_by_wsidicom(tmp_path, known_levels, jpeg2000):
    """Issue #24: a DICOM WSI that a WSI library wrote (wsidicom's own writer and metadata model,
    not our pydicom helper) opens through OpenSlide; plan and patches as for the reference."""
    from tests.wsidicom_helpers import write_dicom_wsi_with_wsidicom

    level0 = known_levels[0]
    t0 = time.perf_counter()
    paths = write_dicom_wsi_with_wsidicom(tmp_path / "wsi", list(known_levels), mpp=1.0, jpeg2000=jpeg2000)
    print(f"wsidicom wrote {[p.stat().st_size for p in paths]} bytes in {time.perf_counter() - t0:.2f} s")
    assert all(openslide.OpenSlide.detect_format(str(p)) == "dicom" for p in paths)
    s = openslide.OpenSlide(str(paths[0]))
    assert s.level_downsamples == (1.0, 4.0) and float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == 1.0
    plan = plan_slide(str(tmp_path / "wsi"))
    print(plan.describe())
    assert (plan.level.index, plan.level.mpp, plan.mask_level, plan.grid) == (0, 1.0, 1, (2, 6))
    means, tissue = _reference_grid(str(paths[0]), 0, 1, 896 // 4)
    print(f"tissue {tissue}; worst mean-grey difference {np.nanmax(np.abs(plan.means - means)):.3f}")
    assert plan.tissue == tissue and np.nanmax(np.abs(plan.means - means)) <= 0.5
    assert (0, 0) in tissue and (1, 4) in tissue and not {(0, 3), (0, 5), (1, 5)} & set(tissue)  # glass, black
    pictures = load_pictures(str(tmp_path / "wsi"))
    assert len(pictures) == len(tissue)
    worst = max(int(np.abs(p.pixels.astype(int) - level0[r * 896:(r + 1) * 896, c * 896:(c + 1) * 896]).max())
                for (r, c), p in zip(tissue, pictures))
    print(f"worst pixel difference against the known image: {worst}")
    assert worst == 0


def test_pictures_stay_pictures(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    Image.fromarray(array).save(tmp_path / "b.tif")  # striped TIFF: no slide
    import tifffile

    tifffile.imwrite(tmp_path / "c.tif", array, tile=(256, 256), photometric="rgb")  # tiled, one level
    for name in ("a.png", "b.tif", "c.tif"):
        assert slide_path(str(tmp_path / name)) is None
        assert np.array_equal(load_pictures(str(tmp_path / name))[0].pixels, array)


def _ask(monkeypatch, *args):
    prompts = []
    render = ChatTemplate.parts
    monkeypatch.setattr(ChatTemplate, "parts", lambda *a, **k: prompts.append(render(*a, **k)) or prompts[-1])
    out = CliRunner().invoke(main, ["ask", "--threads", "2", "--max-tokens", "1", *args])
    return out, "".join(prompts[-1]) if prompts else ""


@pytest.mark.parametrize("extra", [[], ["--budget", "1000"]], ids=["plain", "budget"])
def test_prompt_layout_text_then_patches(monkeypatch, tiny_bundle_f32, slide40x, extra):
    """The notebook's layout: one user turn, the question, then one image per patch, nothing
    between them, no system prompt."""
    out, prompt = _ask(monkeypatch, "-m", str(tiny_bundle_f32), "--image", slide40x, "--max-slices", "3",
                       *extra, QUESTION)
    print(out.output)
    print(prompt.replace("<image_soft_token>", "")[:600])
    assert out.exit_code == 0, out.output
    assert prompt.count("<start_of_image>") == prompt.count("<end_of_image>") == 3
    assert prompt.index(QUESTION) < prompt.index("<start_of_image>")
    assert prompt.count("<start_of_turn>") == 2 and "radiologist" not in prompt  # user, model; no system text
    between = prompt.split("<end_of_image>")[1:-1]
    assert all(piece.split("<start_of_image>")[0].strip() == "" for piece in between)
    assert ("3 of" in out.output and "patches" in out.output) if extra else "3 of 13 tissue patches" in out.output


def test_encode_and_preview(tiny_bundle_f32, slide40x, tmp_path):
    out = CliRunner().invoke(main, ["encode", slide40x, "-m", str(tiny_bundle_f32), "--image-cache",
                                    str(tmp_path / "cache"), "--max-slices", "2", "--threads", "2"])
    print(out.output)
    assert out.exit_code == 0 and "2 picture(s) prepared" in out.output
    sheet = tmp_path / "sheet.png"
    out = CliRunner().invoke(main, ["preview", slide40x, "-o", str(sheet), "--max-slices", "4"])
    print(out.output)
    assert out.exit_code == 0, out.output
    image = np.asarray(Image.open(sheet))
    plan = plan_slide(slide40x, max_slices=4)
    assert image.shape == (944, 1376, 3)  # the mask level: 4 µm/px
    for row, col in plan.sampled:  # each sampled patch's outline is drawn in red at its place
        assert tuple(image[row * 224 + 100, col * 224]) == (230, 40, 40)


def test_bad_slides_are_one_line(tmp_path, slide40x):
    data = open(slide40x, "rb").read()
    (tmp_path / "cut.svs").write_bytes(data[:len(data) // 3])
    (tmp_path / "junk.svs").write_bytes(b"II*\0" + b"\xff" * 5000)
    for name in ("cut.svs", "junk.svs"):
        out = CliRunner().invoke(main, ["preview", str(tmp_path / name), "-o", str(tmp_path / "x.png")])
        print(name, repr(out.output))
        assert out.exit_code == 2 and out.output.startswith("error: ") and out.output.count("\n") == 1


_HUGE = 100_000


def _patterned(width, height, tile=1024):
    """Tiles of tissue where (tile row + tile column) % 3 == 0, white elsewhere: each encoded once."""
    tissue = zlib.compress(np.full((tile, tile, 3), TISSUE_PINK, np.uint8).tobytes())
    white = zlib.compress(np.full((tile, tile, 3), 255, np.uint8).tobytes())
    across = -(-width // tile)
    for i in range(across * -(-height // tile)):
        yield tissue if (i // across + i % across) % 3 == 0 else white


def test_huge_slide_is_read_region_by_region(tmp_path):
    """100,000 × 100,000 pixels (30 GB as RGB): planned and 125 patches read under 1 GB peak RSS
    (the 125 patches themselves are 300 MB)."""
    path = tmp_path / "huge.svs"
    t0 = time.perf_counter()
    levels = [(_HUGE // d, _HUGE // d, None) for d in (1, 2, 4, 8, 16, 32, 64)]
    write_tiff_slide(path, levels, aperio_description(_HUGE, _HUGE, 20, 0.5), tile=1024, tile_for=_patterned)
    print(f"wrote {path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s")
    script = textwrap.dedent(f"""
        import time
        t0 = time.perf_counter()
        from medgemma_edge.runtime.wsi import plan_slide, read_patches
        plan = plan_slide({str(path)!r}, max_slices=125)
        t1 = time.perf_counter()
        pictures = read_patches(plan)
        t2 = time.perf_counter()
        print(plan.describe())
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forked pytest
        peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(len(pictures), plan.mask_level, round(t1 - t0, 2), round(t2 - t1, 2), peak)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    describe, numbers = run.stdout.strip().splitlines()
    count, mask_level, plan_s, read_s, rss_kb = numbers.split()
    print(describe)
    print(f"plan {plan_s} s, 125 patches read in {read_s} s, peak RSS {int(rss_kb) / 1024:.0f} MB")
    assert int(count) == 125 and int(mask_level) == 4  # 8 µm/px, a 6,250-pixel level read in strips
    assert "level 1 at 1 µm/px" in describe
    assert int(rss_kb) < 1024 * 1024


def test_an_uploaded_slide_is_read_through_a_private_file_and_gone_after(slide40x, tmp_path, monkeypatch):
    """Server uploads are bytes: a slide's bytes give the patches its path gives; a plain TIFF stays a picture."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    from_path = load_pictures(str(slide40x), max_slices=5)
    from_bytes = load_pictures(Path(slide40x).read_bytes(), max_slices=5)
    assert len(from_bytes) == len(from_path) == 5
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(from_path, from_bytes))
    array = np.random.default_rng(1).integers(0, 256, (64, 80, 3), np.uint8)
    Image.fromarray(array).save(tmp_path / "plain.tif")
    assert np.array_equal(load_pictures((tmp_path / "plain.tif").read_bytes())[0].pixels, array)
    assert list((tmp_path / "tmp").iterdir()) == [], "the upload's temporary file was left behind"


def test_encode_takes_level_for_a_slide_that_names_no_scale(tiny_bundle_f32, tmp_path):
    """A slide with neither µm/px nor objective power: `encode` refuses it in one line, and with
    --level prepares what `ask --level` then finds in the cache."""
    bare = str(_slide(tmp_path / "bare.tif", description=False))
    cache = str(tmp_path / "cache")
    common = ["-m", str(tiny_bundle_f32), "--image-cache", cache, "--max-slices", "2", "--threads", "2"]
    out = CliRunner().invoke(main, ["encode", bare, *common])
    assert out.exit_code == 2 and "--level" in out.output, out.output
    out = CliRunner().invoke(main, ["encode", bare, *common, "--level", "1"])
    assert out.exit_code == 0 and "2 picture(s) prepared" in out.output, out.output
    out = CliRunner().invoke(main, ["ask", "Describe.", "--image", bare, *common, "--level", "1", "--max-tokens", "1",
                                    "--stats"])
    assert out.exit_code == 0 and '"images_from_cache": 2' in out.stderr, out.stderr[-1000:]
