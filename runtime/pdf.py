"""Clinical documents (a lab report, a discharge letter) as PDF: each page rendered as a picture,
and the page's text layer, where it has one, offered beside it as text.

Google's MedGemma notebooks have no PDF recipe; these are our choices (docs/documents.md):

- Pages are rendered by PDFium (pypdfium2) at DEFAULT_DPI = 96: a Letter page is 816x1056 px,
  an A4 page 794x1123. The model sees 896x896 (pad to square, then resize), so the long side is
  just above it: the resize only ever shrinks a page, never enlarges it, and 96 is the screen
  resolution PDF viewers show a page at actual size. A page then goes the way of every picture
  (runtime/preprocess: padded to square on black, as in MedGemma training).
- At most DEFAULT_MAX_PAGES = 8 pages: each page is one image (256 prompt tokens and an encode).
  A longer PDF is refused, not cut: a lab value on page 9 silently dropped is worse than a
  question to split the file (`--pdf-max-pages` raises the limit). Not --max-slices: its default
  of 85 (a CT volume) is far too many pages.
- Several pages are labelled `PAGE i` after each image, as a CT series' slices are `SLICE i`.
- The text layer (--pdf-text): auto (default) gives a page's text where it has one; on does too
  and refuses a PDF without any (a scan); off gives pictures only; only gives the text without
  pictures (a text-only model, such as MedGemma 27B text). Each page's text follows its own image
  (the model reads a value next to the picture it is printed on), between `[PAGE i TEXT]` and
  `[END OF PAGE i TEXT]` (the chat template joins items with nothing between them, so the end
  marker keeps the question that follows apart), at most MAX_PAGE_TEXT characters. It is text:
  tokenized with special tokens off, as any message text.

PDFium is not thread-safe (pypdfium2's documentation says so): every call into it holds _PDFIUM.
"""

from __future__ import annotations

import threading
import unicodedata
from dataclasses import dataclass

import numpy as np

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.files import note, open_regular, shown
from medgemma_edge.runtime.picture import Picture

DEFAULT_DPI = 96  # Letter 816x1056, A4 794x1123: just above the model's 896, so resizing only shrinks
MIN_DPI, MAX_DPI = 36, 300
DEFAULT_MAX_PAGES = 8
MAX_PAGE_TEXT = 4000  # characters of one page's text: a dense lab report page holds about 3000
MAX_PAGE_PIXELS = 4096 * 4096  # rendered pixels of one page; A4 at 300 dpi is 8.7M
MAX_PDF_BYTES = 256 << 20  # lab reports are kilobytes to a few megabytes; scanned ones tens
TEXT_MODES = ("auto", "on", "off", "only")
TEXT_HELP = ("a PDF's text layer: auto (each page's text after its picture where it has one), on (refuse a "
             "PDF without one), off (pictures only), only (the text without pictures: a text-only model)")
PDF_MAGIC = b"%PDF-"
HEAD_BYTES = 1024  # PDF readers accept the header anywhere in the first 1024 bytes

_PDFIUM = threading.Lock()
_KEPT_CONTROLS = "\n\t"


@dataclass(frozen=True)
class PdfOptions:
    dpi: float = DEFAULT_DPI
    text: str = "auto"  # one of TEXT_MODES
    max_pages: int = DEFAULT_MAX_PAGES


def looks_like_pdf(head: bytes) -> bool:
    """True when the first bytes of a file hold a PDF header."""
    return PDF_MAGIC in bytes(head[:HEAD_BYTES])


def load_pdf(src, options: PdfOptions = PdfOptions()) -> list[Picture]:
    """A PDF (path or bytes) -> one Picture per page: uint8 RGB rendered at options.dpi, labelled
    `PAGE i` when there are several, with the page's text item in `text` as options.text asks."""
    if options.text == "only":
        raise InputError("--pdf-text only gives the text without pictures — read it with pdf_content(), or "
                         "choose auto, on or off")
    return [p for p in _read(src, options, render=True) if isinstance(p, Picture)]


def pdf_content(src, options: PdfOptions = PdfOptions()) -> list[dict]:
    """A PDF as chat content items: one image item of its page Pictures (text attached), or with
    options.text == "only" one text item of every page's text (one item: the template would join
    several with nothing between them)."""
    if options.text != "only":
        return [{"type": "image", "image": load_pdf(src, options)}]
    return [{"type": "text", "text": "\n\n".join(t for t in _read(src, options, render=False) if t)}]


def _read(src, options: PdfOptions, *, render: bool) -> list:
    name, data = _bytes(src)
    _check_options(options)
    import pypdfium2 as pdfium  # imported here: a PNG never needs PDFium

    with _PDFIUM:
        try:
            doc = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as err:
            raise InputError(_open_error(name, err)) from None
        try:
            count = len(doc)
            if count == 0:
                raise InputError(f"{name}: the PDF has no pages — export the document again")
            if count > options.max_pages:
                raise InputError(f"{name}: {count} pages is over the limit of {options.max_pages} (each page is "
                                 f"one image for the model) — split the PDF, or raise the limit with "
                                 f"--pdf-max-pages {count}")
            texts = [_page_text(doc, i) if options.text != "off" else "" for i in range(count)]
            if options.text in ("on", "only") and not any(texts):
                raise InputError(f"{name}: the PDF has no text layer (a scan or an image-only export) — "
                                 f"use --pdf-text auto or off, which read its pages as pictures")
            items = [_text_item(t, i + 1, count, name) for i, t in enumerate(texts)]
            if not render:
                return items
            pictures = [Picture(_render(doc, i, options.dpi, name), f"PAGE {i + 1}" if count > 1 else None,
                                text=items[i] or None) for i in range(count)]
        except pdfium.PdfiumError as err:
            raise InputError(f"{name}: PDFium cannot read a page ({_one_line(err)}) — the file is damaged; "
                             f"export or copy it again") from None
        finally:
            doc.close()
    return pictures


def _bytes(src) -> tuple[str, bytes]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, data = "the PDF bytes", bytes(src)
    else:
        name = shown(src)
        with open_regular(src) as (fh, size):  # regular files only, bounded (runtime/files.py)
            try:
                data = fh.read(MAX_PDF_BYTES + 1) if size <= MAX_PDF_BYTES else None  # +1: grown since the fstat
            except OSError as err:
                raise InputError(f"{name}: cannot read it ({err.strerror or err}) — check the file and the "
                                 f"disk") from None
    if data is None or len(data) > MAX_PDF_BYTES:
        raise InputError(f"{name}: over the {MAX_PDF_BYTES >> 20} MiB limit for a PDF — export the document "
                         f"with fewer or smaller pages (a scan at a lower resolution)")
    return name, data


def _check_options(options: PdfOptions) -> None:
    if options.text not in TEXT_MODES:
        raise InputError(f"unknown PDF text mode {str(options.text)!r:.20} — use one of {', '.join(TEXT_MODES)}")
    if not MIN_DPI <= options.dpi <= MAX_DPI:
        raise InputError(f"PDF resolution {options.dpi} dpi is outside {MIN_DPI}..{MAX_DPI} — the default "
                         f"{DEFAULT_DPI} suits the model's 896-pixel view")
    if options.max_pages < 1:
        raise InputError("the PDF page limit must be at least 1")


def _render(doc, index: int, dpi: float, name: str) -> np.ndarray:
    page = doc[index]
    try:
        w, h = page.get_size()  # points, 1/72 inch
        scale = dpi / 72
        pixels = round(w * scale) * round(h * scale)
        if not (w > 0 and h > 0) or pixels > MAX_PAGE_PIXELS:
            raise InputError(f"{name}: page {index + 1} is {w:.0f}x{h:.0f} points, {pixels:,.0f} pixels at "
                             f"{dpi:g} dpi, over the {MAX_PAGE_PIXELS:,}-pixel limit for a page — pass a lower "
                             f"--pdf-dpi or a document of ordinary page sizes")
        # The same call, with PDFium's defaults (white paper, annotations and forms drawn), that
        # tests/test_pdf.py makes as the reference.
        image = page.render(scale=scale).to_pil()
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # (H, W, 3) uint8
    finally:
        page.close()


def _page_text(doc, index: int) -> str:
    """The page's text layer as plain lines, or "" where it has none."""
    page = doc[index]
    try:
        textpage = page.get_textpage()
        try:
            raw = textpage.get_text_range()
        finally:
            textpage.close()
    finally:
        page.close()
    text = "".join(c if c in _KEPT_CONTROLS or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co")
                   else " " for c in raw.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def _text_item(text: str, page: int, pages: int, name: str) -> str:
    if not text:
        return ""
    if len(text) > MAX_PAGE_TEXT:
        note(f"{name}: page {page}'s text is {len(text):,} characters; the first {MAX_PAGE_TEXT:,} are given")
        text = text[:MAX_PAGE_TEXT] + f"\n[text cut at {MAX_PAGE_TEXT} characters]"
    which = f"PAGE {page} TEXT" if pages > 1 else "PAGE TEXT"
    return f"[{which}]\n{text}\n[END OF {which}]"


def _open_error(name: str, err) -> str:
    code = getattr(err, "err_code", None)
    if code == 4:  # FPDF_ERR_PASSWORD
        return (f"{name}: the PDF is encrypted with a password — save an unprotected copy (print to PDF "
                f"from the viewer that opens it) and pass that")
    if code == 6:  # FPDF_ERR_SECURITY
        return f"{name}: the PDF uses a security handler PDFium does not support — save an unprotected copy"
    return (f"{name}: not a PDF PDFium can read ({_one_line(err)}) — the file is damaged or truncated; "
            f"export or copy it again")


def _one_line(err: BaseException) -> str:
    return (" ".join(str(err).split()) or type(err).__name__)[:200]
