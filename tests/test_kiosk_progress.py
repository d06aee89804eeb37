"""The kiosk page's progress bar (medgemma_edge/server/kiosk/progress.js) in a real headless Chromium:
a question about a four-slice series shows "Encoding image i of 4 — about N s left" and a <progress>
bar before the first word of the answer, then "Reading the images and the question", and the bar
goes once the answer streams. The tiny f32 bundle answers; its image encode is slowed to a second so
the page has time to show each step, and the upload's background encode is skipped so the question
encodes all four (as when a question follows the upload at once). A screenshot of the page while
the bar shows is saved and its path printed. Browser helpers: tests/test_kiosk.py."""

from __future__ import annotations

import re
import time

import pytest

from tests.dicom_helpers import write_series
from tests.test_kiosk import ANSWER_TIMEOUT_MS, KIOSK, _close, _new_page, open_kiosk, wait_for_preview
from tests.test_kiosk import browser  # noqa: F401 — the Chromium fixture

SLICES, ENCODE_S = 4, 1.0


@pytest.fixture(scope="module")
def model(tiny_bundle_f32):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=2, context=4096)


def test_the_progress_script_is_the_servers_own_and_small():
    text = (KIOSK / "progress.js").read_text()
    assert "//" not in text.replace("// ", "").replace("//\n", ""), "no URL in progress.js"
    assert len(text.splitlines()) < 450


def test_a_series_question_shows_the_progress_bar_before_the_answer(browser, model, tmp_path, monkeypatch):
    from medgemma_edge.server import ServerThread, build_app
    from medgemma_edge.server import images
    from medgemma_edge.server.backend import LocalBackend

    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda view: (time.sleep(ENCODE_S), embed(view))[1])
    encoder = images._encoder
    monkeypatch.setattr(images, "_encoder", lambda backend, upload: (lambda _: (), *encoder(backend, upload)[1:]))
    write_series(tmp_path / "series", SLICES)

    with ServerThread(build_app(LocalBackend(model))) as server:
        context, page = _new_page(browser, server.url)
        try:
            open_kiosk(page)
            page.locator("#folder-input").set_input_files(tmp_path / "series")
            assert f"{SLICES} slices" in wait_for_preview(page)
            # every text the progress line shows, with whether the answer had a word yet
            page.evaluate("""() => { window.__seen = []; const text = document.getElementById('progress-text');
                new MutationObserver(() => window.__seen.push([text.textContent,
                    document.getElementById('progress').hidden, document.getElementById('answer').textContent.length]))
                .observe(text, {childList: true, characterData: true, subtree: true}); }""")
            page.locator("#settings summary").click()
            page.get_by_label("Longest answer (tokens)").fill("8")
            box = page.get_by_label(re.compile("^Your question"))
            box.fill("Describe this CT series.")
            box.press("Enter")
            page.wait_for_function("() => /^Encoding image [2-4] of 4 — about \\d+ s left$/"
                                   ".test(document.getElementById('progress-text').textContent)", timeout=60_000)
            shot = tmp_path / "kiosk-progress.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            bar = page.evaluate("(() => { const b = document.getElementById('progress-bar');"
                                " return [b.value, b.max, document.getElementById('progress').hidden]; })()")
            assert bar[1] == SLICES and 1 <= bar[0] < SLICES and bar[2] is False, bar
            assert page.locator("#answer").inner_text() == "", "the bar shows before the answer"

            page.wait_for_function("() => document.getElementById('answer').getAttribute('aria-busy') === 'false'",
                                   timeout=ANSWER_TIMEOUT_MS)
            assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
            seen = page.evaluate("window.__seen")
            print("progress lines:", [s[0] for s in seen])
            assert page.locator("#progress").is_hidden() and page.locator("#answer").inner_text().strip()
            texts = [text for text, hidden, answered in seen if not hidden]
            assert all(answered == 0 for _, hidden, answered in seen if not hidden), seen
            assert texts[0].startswith(f"Encoding image 1 of {SLICES}")
            assert any(t.startswith("Reading the images and the question: ") for t in texts), texts
            assert not page.foreign_requests, page.foreign_requests
        finally:
            _close(context, page)
