"""POST /v1/images and GET /v1/images/{id}[/preview.png]: upload while the user types.

The upload is decoded at once (a bad file is a 400 now, not at the question), then the model worker
encodes it in the background; a later chat naming `medgemma-edge:image/<id>` starts at the text.
"""

from __future__ import annotations

import logging
import re

import anyio.to_thread
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse, Response

from medgemma_edge.runtime.errors import MedGemmaEdgeError
from medgemma_edge.server.errors import INTERNAL, ApiError, response_for
from medgemma_edge.server.state import read_json
from medgemma_edge.server.translate import decode_data_url, image_options
from medgemma_edge.server.uploads import decode, preview_png

log = logging.getLogger("medgemma_edge.server")
_ID = re.compile(r"[0-9a-f]{32}")
FIELDS = ("window", "fit", "max_slices")


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
        pictures, window = await anyio.to_thread.run_sync(decode, blobs, options)
    except Exception as err:
        return response_for(err)
    upload = server.uploads.add(pictures, window, options.get("fit"))
    try:
        server.submit(_encoder(backend, upload), background=True)
    except ApiError:  # the queue filled meanwhile: the chat will encode it
        upload.status = "ready"
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
    size = getattr(server.backend, "image_size", None) or 896
    try:
        png = await anyio.to_thread.run_sync(preview_png, upload, size, upload.fit)
    except Exception as err:
        return response_for(err)
    # Patient pixels: no browser or proxy may keep a copy.
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def _upload(request):
    upload_id = request.path_params["image_id"]
    return request.app.state.medgemma.uploads.get(upload_id) if _ID.fullmatch(upload_id) else None


def _missing():
    return response_for(ApiError(404, "no uploaded image with this id (the server keeps recent uploads in "
                                      "memory only) — upload it again"))


def _encoder(backend, upload):
    """The background job: encode the upload's pictures into the image cache, record the outcome."""
    messages = [{"role": "user", "content": [{"type": "image", "image": list(upload.pictures)}]}]
    options = {"fit": upload.fit} if upload.fit else {}

    def run(cancelled):
        try:
            backend.prepare(messages, options)
            upload.status = "ready"
        except MedGemmaEdgeError as err:
            upload.status, upload.error = "error", str(err)
        except Exception as err:
            log.error("encoding an upload failed: %s", type(err).__name__)
            upload.status, upload.error = "error", INTERNAL

    return run


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
