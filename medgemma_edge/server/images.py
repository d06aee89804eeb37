"""POST /v1/images and GET /v1/images/{id}[/preview.png]: upload while the user types.

The upload is decoded at once on the runtime's one picture path (`load_pictures`: DICOM windowed,
a series ordered and thinned; each Picture records the CT window it was made with), so a bad file
is a 400 now, not at the question. The model worker then encodes it in the background; a later
chat naming `medgemma-edge:image/<id>` finds its embeddings in the image cache and starts at the
text. The store (uploads.py) only keeps the pictures.
"""

from __future__ import annotations

import io
import logging
import re

import anyio.to_thread
import numpy as np
from PIL import Image
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse, Response

from medgemma_edge.runtime.errors import MedGemmaEdgeError
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES, Picture
from medgemma_edge.runtime.preprocess import IMAGE_SIZE, model_view
from medgemma_edge.runtime.preview import contact_sheet
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.server.errors import INTERNAL, ApiError, response_for
from medgemma_edge.server.http import read_json
from medgemma_edge.server.translate import decode_data_url, image_options, is_dicom
from medgemma_edge.server.uploads import Upload
from medgemma_edge.server.worker import Cancelled

log = logging.getLogger("medgemma_edge.server")
_ID = re.compile(r"[0-9a-f]{32}")
FIELDS = ("window", "fit", "max_slices")
SHEET_TILE = 256  # a series preview shows each slice at this size: 85 full-size views would be a huge PNG


class _InMemoryParser(MultiPartParser):
    # Uploaded files are patient data: kept in memory (the body limit bounds them), never spooled
    # to a temporary file on disk.
    spool_max_size = 1 << 62


async def create_image(request):
    server = request.app.state.medgemma
    try:
        backend = server.require_backend()
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            blobs, fields = await _from_form(request, server.config.max_images)
        else:
            blobs, fields = _from_json(await read_json(request))
        if not blobs:
            raise ApiError(400, "no image — send one or more 'file' fields, or JSON {\"url\": DATA_URL}", "file")
        if len(blobs) > server.config.max_images:
            raise ApiError(400, f"too many files: {len(blobs)} (at most {server.config.max_images})", "file")
        options = image_options(fields)
        server.check_queue()  # refuse before the slow decode when the model could not take it
        pictures = await anyio.to_thread.run_sync(decode, blobs, options)
    except Exception as err:
        return response_for(err)
    upload = server.uploads.add(pictures, options.get("fit"))
    server.worker.submit_steps(*_encoder(backend, upload))  # the background lane: never refused
    return JSONResponse(upload.created())


async def get_image(request):
    upload = _upload(request)
    if upload is None:
        return _missing()
    return JSONResponse(upload.describe())


async def get_preview(request):
    server = request.app.state.medgemma
    upload = _upload(request)
    if upload is None:
        return _missing()
    size = getattr(server.backend, "image_size", None) or IMAGE_SIZE
    try:
        png = await anyio.to_thread.run_sync(preview_png, upload, size, upload.fit)
    except Exception as err:
        return response_for(err)
    # Patient pixels: no browser or proxy may keep a copy.
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def decode(blobs: list[tuple[str, bytes]], options: dict) -> list[Picture]:
    """Pictures of one upload (a picture, a DICOM file, or the DICOM files of one series). Runs
    off the event loop: a CT series takes seconds."""
    if len(blobs) > 1 and not all(is_dicom(mime, data) for mime, data in blobs):
        raise ApiError(400, "several files in one upload must all be DICOM files of one series — upload "
                            "pictures one at a time", "file")
    source = blobs[0][1] if len(blobs) == 1 else [data for _, data in blobs]
    return load_pictures(source, window=options.get("window"),
                         max_slices=options.get("max_slices", DEFAULT_MAX_SLICES))


def preview_png(upload: Upload, image_size: int, fit: str | None) -> bytes:
    """PNG of what the model sees: the one view, or a labelled contact sheet of a series."""
    if upload.preview is None:
        upload.preview = sheet_png(upload.pictures, image_size, fit)
    return upload.preview


def sheet_png(pictures: list[Picture], image_size: int, fit: str | None) -> bytes:
    """The one picture's model view, or a labelled contact sheet of several, as PNG bytes."""
    pixels = [p.pixels for p in pictures]
    kwargs = {"fit": fit} if fit else {}
    if len(pixels) == 1:
        sheet = model_view(pixels, image_size, threads=1, **kwargs)[0]
    else:
        views = model_view(pixels, min(image_size, SHEET_TILE), threads=1, **kwargs)
        sheet = contact_sheet(views, [p.label for p in pictures])
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(sheet)).save(out, format="PNG")
    return out.getvalue()


def _upload(request):
    upload_id = request.path_params["image_id"]
    return request.app.state.medgemma.uploads.get(upload_id) if _ID.fullmatch(upload_id) else None


def _missing():
    return response_for(ApiError(404, "no uploaded image with this id (the server keeps recent uploads in "
                                      "memory only) — upload it again"))


def _encoder(backend, upload):
    """The background task (the worker's lane): encode the upload's pictures into the image cache,
    step by step where the backend can (a question then waits one encode at most, not a whole
    series); record the outcome. (make_steps, on_step, on_done) for `Worker.submit_steps`."""
    messages = [{"role": "user", "content": [{"type": "image", "image": list(upload.pictures)}]}]
    options = {"fit": upload.fit} if upload.fit else {}

    def make_steps(should_pause):
        if hasattr(backend, "prepare_steps"):
            return backend.prepare_steps(messages, options, should_pause)
        backend.prepare(messages, options)  # no model here (upstream): one step
        return ()

    def on_done(err):
        if err is None or isinstance(err, Cancelled):  # cancelled (shutdown): the chat would encode it
            upload.status = "ready"
        elif isinstance(err, MedGemmaEdgeError):
            upload.status, upload.error = "error", str(err)
        else:
            log.error("encoding an upload failed: %s", type(err).__name__)
            upload.status, upload.error = "error", INTERNAL

    return make_steps, None, on_done


async def _from_form(request, max_files: int):
    parser = _InMemoryParser(request.headers, request.stream(), max_files=max_files, max_fields=len(FIELDS) * 2)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise ApiError(400, f"the multipart body cannot be read ({err.message}) — send 'file' fields") from None
    try:
        blobs = []
        for item in form.getlist("file"):
            if isinstance(item, str):
                raise ApiError(400, "'file' must be a file field (with a filename), not text", "file")
            blobs.append(((item.content_type or "").lower(), await item.read()))
        fields = {name: form.get(name) for name in FIELDS if isinstance(form.get(name), str) and form.get(name)}
    finally:
        await form.close()
    if "max_slices" in fields:
        text = fields["max_slices"].strip()
        fields["max_slices"] = int(text) if text.isdigit() else text  # image_options refuses non-numbers
    return blobs, fields


def _from_json(body):
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object {\"url\": DATA_URL} or {\"urls\": [...]}")
    urls = body.get("urls") if body.get("urls") is not None else [body.get("url")] if "url" in body else []
    if not isinstance(urls, list):
        raise ApiError(400, "urls must be a list of data: URLs", "urls")
    blobs = [decode_data_url(url, f"urls[{i}]") for i, url in enumerate(urls)]
    return blobs, {name: body.get(name) for name in FIELDS}
