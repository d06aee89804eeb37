"""box_2d answers mapped back to the original picture: exact numbers for each fit, and a round trip
through the real preprocessing (a drawn rectangle found in the model's view comes back in place)."""

import numpy as np
import pytest

from medgemma_edge.runtime.boxes import boxes_on_original, parse_boxes, to_original
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.preprocess import model_view

BOX = (500, 250, 750, 750)  # (y0, x0, y1, x1) in thousandths of the view


@pytest.mark.parametrize("h,w,fit,want", [
    # 600×1000 padded to 1000²: 200 black rows on top → y − 200
    (600, 1000, "pad", (250.0, 300.0, 750.0, 550.0)),
    # 601 rows: (1000 − 601) // 2 = 199 on top, the odd row at the bottom (preprocess.fit_square)
    (601, 1000, "pad", (250.0, 301.0, 750.0, 551.0)),
    # 1000×600 (portrait): 200 black columns on the left → x − 200, x1 = 550
    (1000, 600, "pad", (50.0, 500.0, 550.0, 750.0)),
    # square: every fit is the plain scale
    (800, 800, "pad", (200.0, 400.0, 600.0, 600.0)),
    (800, 800, "stretch", (200.0, 400.0, 600.0, 600.0)),
    # stretch: x by W, y by H
    (600, 1000, "stretch", (250.0, 300.0, 750.0, 450.0)),
])
def test_known_boxes_map_to_exact_pixels(h, w, fit, want):
    got = to_original(BOX, h, w, fit)
    print(f"{h}x{w} {fit}: {got}")
    assert got == pytest.approx(want, abs=1e-9)


def test_a_box_in_the_padding_is_clipped_to_the_picture():
    # 600×1000 padded: view rows 0..200 are black padding; a box from the top edge starts at y = 0
    assert to_original((0, 0, 300, 1000), 600, 1000, "pad") == (0.0, 0.0, 1000.0, 100.0)
    assert to_original((750, 100, 250, 50), 600, 1000, "pad") == (50.0, 50.0, 100.0, 550.0)  # corners sorted


@pytest.mark.parametrize("fit", ["pad", "stretch"])
@pytest.mark.parametrize("h,w", [(600, 1000), (1000, 600), (457, 701)])
def test_a_rectangle_seen_by_the_model_comes_back_in_place(fit, h, w):
    """Draw a white rectangle, make the model's view (runtime/preprocess), read its box there as the
    model would (thousandths of the view), map back: within 1 view pixel, in original pixels."""
    picture = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = int(w * 0.3), int(h * 0.2), int(w * 0.7), int(h * 0.9)
    picture[y0:y1, x0:x1] = 255
    view = model_view(picture, size=896, fit=fit, threads=1)[0, :, :, 0]  # (896, 896)
    rows, cols = np.flatnonzero(view.max(1) > 127), np.flatnonzero(view.max(0) > 127)
    seen = (rows[0] / 896 * 1000, cols[0] / 896 * 1000, (rows[-1] + 1) / 896 * 1000, (cols[-1] + 1) / 896 * 1000)
    got = np.array(to_original(seen, h, w, fit))
    tol = max(h, w) / 896 + 1e-9 if fit == "pad" else max(h / 896, w / 896) + 1e-9  # one view pixel
    worst = np.abs(got - (x0, y0, x1, y1)).max()
    print(f"{h}x{w} {fit}: drawn {(x0, y0, x1, y1)} back {tuple(got.round(2))} worst {worst:.2f} px (tol {tol:.2f})")
    assert worst <= tol


def test_parse_json_list_fenced_block_and_free_text():
    answer = ('Here:\n```json\n[{"box_2d": [100, 200, 300, 400], "label": "nodule"},\n'
              ' {"label": "effusion", "box_2d": [500, 0, 900, 450]}]\n```')
    assert parse_boxes(answer) == [("nodule", (100.0, 200.0, 300.0, 400.0)), ("effusion", (500.0, 0.0, 900.0, 450.0))]
    broken = 'boxes: {"box_2d": [10, 20, 30, 40], "label": "a"}, {"label": "b", "box_2d": [1,2,3,4]'  # not JSON
    assert parse_boxes(broken) == [("a", (10.0, 20.0, 30.0, 40.0)), ("b", (1.0, 2.0, 3.0, 4.0))]
    assert parse_boxes('{"findings": {"box_2d": [1, 2, 3, 4]}}') == [(None, (1.0, 2.0, 3.0, 4.0))]
    assert parse_boxes("no boxes here") == []


def test_boxes_on_original_returns_both_scales():
    (box,) = boxes_on_original('[{"box_2d": [500, 250, 750, 750], "label": "x"}]', 600, 1000, "pad")
    print(box.as_dict())
    assert box.as_dict() == {"label": "x", "box_2d": [500.0, 250.0, 750.0, 750.0], "xyxy": [250.0, 300.0, 750.0, 550.0],
                             "image_size": [1000, 600]}


@pytest.mark.parametrize("args,says", [((BOX, 600, 1000, "squash"), "unknown fit"), ((BOX, 0, 10), "positive"),
                                       ((BOX, 600, 1000, "crop"), "unknown fit")])  # exactly preprocess.FITS
def test_bad_arguments_are_input_errors(args, says):
    with pytest.raises(InputError, match=says):
        to_original(*args)


def test_describe_is_one_line_with_both_scales():
    box = boxes_on_original('{"box_2d": [500, 250, 750, 750], "label": "nodule"}', 201, 300, "pad")[0]
    line = box.describe()
    print(line)
    assert line == ('box "nodule": box_2d [500, 250, 750, 750] (y0, x0, y1, x1 of 1000) = '
                    "x0,y0,x1,y1 75,101,225,176 px of the 300×201 original")
    assert boxes_on_original("box_2d: [0, 0, 333, 1000]", 201, 300, "stretch")[0].describe().startswith(
        "box (no label): box_2d [0, 0, 333, 1000] (y0, x0, y1, x1 of 1000) = x0,y0,x1,y1 0,0,300,66.9 px")


def test_answer_boxes_only_for_one_single_picture():
    """Sizes per image item, as the prompt's decode found them: one item of one picture maps;
    several items, a series (several pictures in one item) or no image give none."""
    from medgemma_edge.runtime.boxes import answer_boxes

    answer = '[{"box_2d": [500, 250, 750, 750], "label": "nodule"}]'
    boxes = answer_boxes(answer, [[(201, 300)]], "pad")
    print([b.as_dict() for b in boxes])
    assert [(b.xyxy, b.image_size) for b in boxes] == [((75.0, 101.0, 225.0, 176.0), (300, 201))]
    assert answer_boxes("no box", [[(201, 300)]], "pad") == []
    assert answer_boxes(answer, [[(201, 300)], [(201, 300)]], "pad") == []
    assert answer_boxes(answer, [[(201, 300)] * 3], "pad") == []
    assert answer_boxes(answer, [], "pad") == []
