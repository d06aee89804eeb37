"""The kiosk page (medgemma_edge/server/kiosk/) in a real headless Chromium against the real server.

Debian's `chromium` (installed by `make install`; `playwright install` would need the internet)
is driven by Playwright. The server runs the tiny f32 bundle in a thread on a free loopback port.
The main test does what a receptionist does: pick a DICOM file, wait for the preview, type a
question, press Enter, watch the answer stream in; it saves a screenshot and prints its path.
Every page runs under the server's Content-Security-Policy; a violation fails the test. (The
policy forbids eval(), which Playwright uses for a string condition: conditions are written as
functions, "() => …", which it calls without eval.)

Without chromium (or playwright) the browser tests FAIL, never skip quietly: set
MEDGEMMA_EDGE_ALLOW_NO_BROWSER=1 to skip them on a machine that cannot have a browser.
"""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

KIOSK = Path(__file__).resolve().parents[1] / "medgemma_edge" / "server" / "kiosk"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_TOKENS = 12  # enough streamed pieces to see the answer grow; the tiny model's words are noise
ANSWER_TIMEOUT_MS = 180_000  # CPU image encode + prefill + decode on a loaded CI machine
TOUCH_TARGET_PX = 44  # WCAG 2.5.5 / Apple HIG minimum; the CSS asks for 48 (3rem at 16-18 px)


def test_window_presets_match_the_runtime():
    """The page's CT window list is typed out in index.html; it must name the runtime's presets."""
    from medgemma_edge.runtime.dicom.windows import DEFAULT_PRESET, PRESET_NAMES

    class Options(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.values, self._inside = [], False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self._inside = self._inside or (tag == "select" and attrs.get("id") == "window-select")
            if self._inside and tag == "option":
                self.values.append(attrs.get("value") or DEFAULT_PRESET)  # "" = the server's default

        def handle_endtag(self, tag):
            self._inside = self._inside and tag != "select"

    parser = Options()
    parser.feed((KIOSK / "index.html").read_text())
    assert sorted(parser.values) == sorted(PRESET_NAMES), (parser.values, PRESET_NAMES)


def test_page_loads_nothing_from_outside():
    """No CDN, no web fonts: every URL in the page and its assets is this server's own."""
    for name in ("index.html", "kiosk.js", "kiosk.css"):
        text = (KIOSK / name).read_text()
        remote = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text, re.IGNORECASE)
        assert not remote, f"{name} refers to {remote}: the kiosk must work with no internet"
        assert len(text.splitlines()) < 450, f"{name} is {len(text.splitlines())} lines: split it"


# ---- the browser tests ------------------------------------------------------------------------


API_KEY = "kiosk-test-key"


@pytest.fixture(scope="module")
def backend(tiny_bundle_f32):
    import medgemma_edge
    from medgemma_edge.server.backend import LocalBackend

    return LocalBackend(medgemma_edge.load(tiny_bundle_f32, threads=2, context=2048))


def _serve(backend, **config):
    from medgemma_edge.server import ServerConfig, ServerThread, build_app

    return ServerThread(build_app(backend, ServerConfig(**config)))  # 127.0.0.1, a free port


@pytest.fixture(scope="module")
def server_url(backend):
    with _serve(backend) as server:
        yield server.url


@pytest.fixture(scope="module")
def keyed_server_url(backend):
    with _serve(backend, api_key=API_KEY) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    executable = shutil.which("chromium")
    if sync_api is None or executable is None:
        missing = "playwright (pip install -e '.[dev]')" if sync_api is None else \
            "`chromium` on PATH (apt-get install -y chromium; `make install` does it as root)"
        if os.environ.get("MEDGEMMA_EDGE_ALLOW_NO_BROWSER") == "1":
            pytest.skip(f"no {missing}; MEDGEMMA_EDGE_ALLOW_NO_BROWSER=1")
        pytest.fail(f"the kiosk tests need {missing} — or set MEDGEMMA_EDGE_ALLOW_NO_BROWSER=1 to skip them")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _new_page(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=url)
    # Every Content-Security-Policy violation the page meets, reported by the browser itself.
    context.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation',"
                            " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
    page = context.new_page()
    foreign = []  # every request that is not to our server: a kiosk with no internet has none
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else foreign.append(r.url))
    page.foreign_requests = foreign
    page.csp_errors = []
    page.on("console", lambda m: page.csp_errors.append(m.text) if "Content Security Policy" in m.text else None)
    return context, page


def _close(context, page) -> None:
    violations = page.evaluate("window.__csp || []") if not page.is_closed() else []
    context.close()
    assert not violations and not page.csp_errors, (violations, page.csp_errors)


@pytest.fixture
def page(browser, server_url):
    context, page = _new_page(browser, server_url)
    yield page
    _close(context, page)


@pytest.fixture
def keyed_page(browser, keyed_server_url):
    context, page = _new_page(browser, keyed_server_url)
    yield page
    _close(context, page)


def _ct_small() -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")


def open_kiosk(page) -> None:
    """Open the page and wait until the model is there (its name shown, asking allowed)."""
    page.goto("/")
    page.wait_for_function("() => !['connecting…', 'loading the model…']"
                           ".includes(document.getElementById('model-name').textContent)")


def upload_through_the_picker(page, path: str) -> None:
    """Tap "Choose file(s)" and pick `path` in the file chooser, as a person would."""
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Choose file(s)").click()
    chooser.value.set_files(path)


def wait_for_preview(page) -> str:
    """Wait until the preview PNG has loaded (or an error shows); returns its caption."""
    page.wait_for_function("() => { const i = document.getElementById('preview-img');"
                           " return (i.complete && i.naturalWidth > 0)"
                           " || !document.getElementById('error').hidden; }", timeout=60_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    return page.locator("#preview-caption").inner_text()


def ask_and_wait(page, question: str) -> str:
    """Type `question`, press Enter, wait until the streamed answer is finished; returns it."""
    if not page.locator("#settings").evaluate("d => d.open"):
        page.locator("#settings summary").click()
    page.get_by_label("Longest answer (tokens)").fill(str(MAX_TOKENS))
    box = page.get_by_label(re.compile("^Your question"))
    box.fill(question)
    box.press("Enter")
    page.wait_for_function("() => document.getElementById('answer').getAttribute('aria-busy') === 'true'")
    page.wait_for_function("() => document.getElementById('answer').getAttribute('aria-busy') === 'false'",
                           timeout=ANSWER_TIMEOUT_MS)
    return page.locator("#answer").inner_text()


def test_dicom_upload_preview_and_streamed_answer(page, backend, monkeypatch, tmp_path):
    notice = "DEMO MODEL: random weights, its answers mean nothing"  # as a demo bundle's would say
    monkeypatch.setattr(backend, "notice", notice)
    open_kiosk(page)
    assert page.locator("#model-name").inner_text() == backend.model_id
    assert "Not a diagnosis" in page.locator("#disclaimer").inner_text()
    page.locator("#notice").wait_for(state="visible")
    assert page.locator("#notice").inner_text() == notice

    upload_through_the_picker(page, _ct_small())
    caption = wait_for_preview(page)
    assert "CT window" in caption, caption  # CT_small is a CT: the window used is shown

    # Count the answer's growth while it streams: more than one visible step means it streamed.
    page.evaluate("""() => { window.__steps = 0; new MutationObserver(() => window.__steps++)
        .observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true}); }""")
    answer = ask_and_wait(page, "Describe this CT slice.")
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    stats = page.locator("#stats").inner_text()
    assert re.search(r"\d+ tokens", stats), stats
    steps = page.evaluate("window.__steps")
    print(f"answer ({steps} DOM updates while streaming): {answer!r}; stats: {stats}")
    assert answer.strip() and steps > 1, (answer, steps)

    shot = tmp_path / "kiosk.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert not page.foreign_requests, page.foreign_requests


def test_series_folder_is_one_contact_sheet(page, tmp_path):
    from tests.dicom_helpers import write_series

    folder = tmp_path / "series"
    write_series(folder, 4)
    (folder / ".DS_Store").write_bytes(b"\0" * 300)  # folder clutter the page leaves behind
    open_kiosk(page)
    page.locator("#folder-input").set_input_files(folder)  # what "Choose series folder" opens
    caption = wait_for_preview(page)
    assert "4 slices" in caption, caption
    width, height = page.evaluate("(() => { const i = document.getElementById('preview-img');"
                                  " return [i.naturalWidth, i.naturalHeight]; })()")
    assert width > 2 * 100 and height > 2 * 100, (width, height)  # a 2x2 sheet of model views


def test_a_bad_file_is_one_readable_error_line(page, tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"not really a DICOM file")
    open_kiosk(page)
    upload_through_the_picker(page, str(bad))
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=30_000)
    text = error.inner_text()
    print(f"error line: {text}")
    assert text.startswith("Error 400: ") and "\n" not in text and len(text) < 400, text
    assert "Traceback" not in text and "<" not in text, text
    assert page.locator("#preview").is_hidden()


def test_touch_targets_labels_and_keyboard(page):
    open_kiosk(page)
    # every visible control has a label a screen reader reads out
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.type !== 'file' && e.labels.length === 0).map(e => e.id)""")
    assert not unlabelled, unlabelled
    page.locator("#settings summary").click()
    small = page.evaluate(f"""() => [...document.querySelectorAll('button, summary, input, select, textarea')]
        .filter(e => e.offsetParent !== null)
        .map(e => [e.id || e.tagName, e.getBoundingClientRect().height])
        .filter(([_, h]) => h < {TOUCH_TARGET_PX})""")
    assert not small, f"touch targets under {TOUCH_TARGET_PX} px: {small}"
    # the tab order reaches the picker first, then the question and Send
    order = []
    for _ in range(8):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order.index("pick-files") < order.index("question") < order.index("send"), order
    # a phone-sized screen: one column, nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 844})
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a 390 px screen"


def test_api_key_is_asked_for_then_kept_for_the_tab(keyed_page):
    page = keyed_page
    page.goto("/")  # the page itself needs no key; /v1/models does
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=30_000)
    assert error.inner_text().startswith("Error 401: "), error.inner_text()
    assert page.locator("#settings").evaluate("d => d.open"), "Settings should open to ask for the key"
    key = page.get_by_label(re.compile("^API key"))
    key.fill(API_KEY)
    key.press("Enter")  # `change` fires: the page retries with the key
    page.wait_for_function("() => document.getElementById('error').hidden", timeout=30_000)
    assert page.evaluate("sessionStorage.getItem('medgemma-edge.api-key')") == API_KEY
    page.reload()
    page.wait_for_function("() => document.getElementById('model-name').textContent !== 'connecting…'")
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    assert page.get_by_label(re.compile("^API key")).input_value() == API_KEY


def test_the_page_says_loading_until_the_model_is_ready(browser, backend):
    """Served with a loader that waits: the page says so and lets nobody ask; then it is ready."""
    loaded = threading.Event()

    def load():
        assert loaded.wait(60)
        return backend

    from medgemma_edge.server import ServerThread, build_app

    with ServerThread(build_app(load)) as server:
        context, page = _new_page(browser, server.url)
        try:
            page.goto("/")
            page.wait_for_function("() => document.getElementById('model-name').textContent === 'loading the model…'")
            for button in ("#send", "#pick-files", "#pick-folder"):
                assert page.locator(button).is_disabled(), f"{button} is enabled while the model loads"
            loaded.set()
            page.wait_for_function(f"() => document.getElementById('model-name').textContent === {backend.model_id!r}",
                                   timeout=30_000)
            for button in ("#send", "#pick-files", "#pick-folder"):
                assert page.locator(button).is_enabled(), f"{button} is still disabled with the model loaded"
            assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
        finally:
            loaded.set()
            _close(context, page)
