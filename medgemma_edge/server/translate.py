"""OpenAI's chat request in, the runtime's messages and options out (runtime/chat.py's format).

Everything a client can get wrong is caught here with a 400 naming the field, before the request
takes a place in the model's queue. Images arrive as data: URLs (PNG, JPEG, DICOM), as
`medgemma-edge:image/<id>` (an upload), or, with a DICOM node, as `medgemma-edge:study/<UID>` /
`medgemma-edge:series/<UID>` and Google's `image_dicom` part (the node's files; server/studies.py
pulls what it lacks from its --dicomweb server first); the server never fetches a URL itself.

A chat with no system message and no preset gets the model card's default system prompt
(runtime.presets.card_system: images or text), the one rule `ask` and the node use, so a question
about a study the node prepared starts at the saved prefix. A chat with a prior X-ray part (server/prior.py)
gets none: Google's longitudinal layout has no system prompt.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from medgemma_edge.runtime.dicom.windows import parse_window
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.preprocess import FITS
from medgemma_edge.runtime.presets import card_system
from medgemma_edge.runtime.sources import is_dicom_path
from medgemma_edge.node.studies import SERIES, STUDY
from medgemma_edge.server.errors import ApiError
from medgemma_edge.server.prior import place_prior, prior_flag, take_prior
from medgemma_edge.server.tools import Tools, call_text, parse_tools, response_schema, result_text
from medgemma_edge.server.uploads import UPLOAD_SCHEME
from medgemma_edge.structured import resolve_options

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED = ("functions", "function_call", "logprobs")  # tools and response_format: server/tools.py
_WHY_DATA = ("send the image itself as a data: URL (data:image/png;base64,…, data:image/jpeg;base64,… or "
             "data:application/dicom;base64,…) or upload it to POST /v1/images")


@dataclass
class ChatRequest:
    messages: list[dict]  # runtime format: {"type": "image", "image": SOURCE} items
    options: dict  # Backend.chat options; only those the client set, plus max_tokens and repetition_guard
    stream: bool = False
    include_usage: bool = False
    images: int = 0
    image_bytes: int = 0  # length of the body's image data: URLs (the rest is text: MAX_TEXT_MB)
    uploads: list[str] = field(default_factory=list)
    tools: Tools | None = None  # the answer may be a tool call (server/tools.py)
    studies: list[str] = field(default_factory=list)  # UIDs of the node's studies the chat names
    store_result: bool = False  # the answer goes to the PACS as a draft (medgemma_edge.store_result)
    prior: str | None = None  # the param of the part flagged as a prior X-ray (server/prior.py)


def decode_data_url(url, param: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 data: URL; 400 for a remote or malformed URL."""
    if not isinstance(url, str):
        raise ApiError(400, f"{param} must be a string URL — {_WHY_DATA}", param)
    head = url[:16].lower()
    if head.startswith(("http://", "https://", "ftp://", "file:")):
        raise ApiError(400, f"{param}: this server never fetches URLs (it runs offline) — {_WHY_DATA}", param)
    match = _DATA_URL.match(url)
    if match is None:
        raise ApiError(400, f"{param} is not a data: URL — {_WHY_DATA}", param)
    if not match.group("b64"):
        raise ApiError(400, f"{param}: the data: URL is not base64 — encode the file as base64", param)
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: the base64 data is damaged — encode the file again", param) from None
    if not data:
        raise ApiError(400, f"{param}: the data: URL holds no bytes", param)
    return (match.group("mime") or "").lower(), data


def is_dicom(mime: str, data: bytes) -> bool:
    """A DICOM part by its type, or by its content (some clients label every file image/*)."""
    return mime == "application/dicom" or is_dicom_path(data)


def image_options(fields: dict, where: str = "") -> dict:
    """window, fit, max_slices (the image path's own options), checked; only those given."""
    out = {}
    window = fields.get("window")
    if window is not None:
        if not isinstance(window, str):
            raise ApiError(400, f"{where}window must be a preset name or 'lo:hi,…' text", f"{where}window")
        try:
            parse_window(window)
        except InputError as err:
            raise ApiError(400, str(err), f"{where}window") from None
        out["window"] = window
    fit = fields.get("fit")
    if fit is not None:
        if fit not in FITS:
            raise ApiError(400, f"{where}fit must be one of {', '.join(FITS)}", f"{where}fit")
        out["fit"] = fit
    max_slices = fields.get("max_slices")
    if max_slices is not None:
        out["max_slices"] = _integer(max_slices, f"{where}max_slices", least=1)
    return out


def chat_request(body, uploads, *, max_images: int, max_tokens: int, node=None,
                 repetition_guard: bool = True) -> ChatRequest:
    """Check an OpenAI chat.completions body and translate it; ApiError(400) for the first fault.
    node: the DICOM node whose studies the chat may name (None: the server has none).
    repetition_guard: the server's default, for a request whose medgemma_edge names none."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object with 'messages'")
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, [], {"type": "text"}):
            raise ApiError(400, f"{name} is not supported by this server — leave it out", name)
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: this server gives one answer per request", "n")
    request = ChatRequest(messages=[], options=_options(body, max_tokens))
    request.options.setdefault("repetition_guard", repetition_guard)
    request.store_result = _flag((body.get("medgemma_edge") or {}).get("store_result", False),
                                 "medgemma_edge.store_result")
    request.stream = _flag(body.get("stream", False), "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    request.include_usage = _flag(stream_options.get("include_usage", False), "stream_options.include_usage")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    fits, call_names, after_tool = set(), {}, False
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "tool":
            text = result_text(message, call_names, f"messages[{i}]")
            if after_tool:  # consecutive results: one user turn
                request.messages[-1]["content"] += "\n\n" + text
            else:
                request.messages.append({"role": "user", "content": text})
            after_tool = True
            continue
        after_tool = False
        if isinstance(message, dict) and message.get("role") == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"] if isinstance(message["tool_calls"], list) else ():
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    call_names[call.get("id")] = call["function"].get("name")
            message = {**message, "content": call_text(message["tool_calls"], f"messages[{i}]")}
        request.messages.append(_message(message, i, uploads, request, fits, node))
    if request.studies and "max_slices" not in request.options:  # as the node prepared them
        request.options["max_slices"] = node.config.max_slices
    _structure(body, request)
    if request.images > max_images:
        raise ApiError(400, f"too many images: {request.images} (this server takes at most {max_images} per "
                            "request) — send fewer, or fewer slices of the series", "messages")
    if "fit" not in request.options and len(fits) == 1:  # encode as the upload was, so its embeddings are reused
        request.options["fit"] = fits.pop()
    return request


def _structure(body: dict, request: ChatRequest) -> None:
    """Preset, tools and response_format: the system turn, length, thinking and constraint they add."""
    opts = request.options
    schema = response_schema(body)
    request.tools = parse_tools(body)
    if schema is not None and request.tools is not None:
        raise ApiError(400, "response_format and tools cannot both hold the answer — send one of them",
                       "response_format")
    try:  # resolved as `ask` resolves it; response_format or tools settle the answer's shape
        chosen = resolve_options(body.get("preset"), max_new_tokens=opts["max_tokens"] if _names_limit(body) else None,
                                 think=opts.get("think"), json_schema=schema, default_max_new_tokens=opts["max_tokens"],
                                 preset_schema=body.get("response_format") is None and request.tools is None)
    except InputError as err:
        raise ApiError(400, str(err), "preset") from None
    opts["max_tokens"] = chosen.max_new_tokens
    if chosen.think is not None:
        opts["think"] = chosen.think
    if chosen.json_schema is not None:
        opts["json_schema"] = chosen.json_schema
    if request.tools is not None:
        opts.update(request.tools.constraint())
    messages = request.messages
    has_system = bool(messages) and messages[0]["role"] == "system"
    extra = request.tools.prompt() if request.tools is not None else None
    system = chosen.system or (None if request.prior else card_system(_has_images(messages)))
    if not has_system and (system is not None or extra):  # a prior: Google's layout has no system prompt
        messages.insert(0, {"role": "system", "content": system or ""})
    if extra:
        content = messages[0]["content"]
        messages[0] = {"role": "system", "content": (content + "\n\n" + extra).strip() if isinstance(content, str)
                       else [*content, {"type": "text", "text": extra}]}


def _has_images(messages: list[dict]) -> bool:
    return any(isinstance(m["content"], list) and any(i.get("type") == "image" for i in m["content"])
               for m in messages)


def _names_limit(body: dict) -> bool:
    return body.get("max_completion_tokens", body.get("max_tokens")) is not None


def _options(body: dict, max_tokens: int) -> dict:
    options = {"max_tokens": max_tokens}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        options["max_tokens"] = _integer(limit, "max_tokens", least=1)
    for name, least, most in (("temperature", 0.0, None), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < least or (
                    most is not None and value > most):
                raise ApiError(400, f"{name} must be a number ≥ {least}" + (f" and ≤ {most}" if most else ""), name)
            options[name] = float(value)
    if options.get("top_p") == 0.0:
        raise ApiError(400, "top_p must be above 0", "top_p")
    if body.get("seed") is not None:
        options["seed"] = _integer(body["seed"], "seed", least=None)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
            raise ApiError(400, "stop must be a string or a list of up to 16 non-empty strings", "stop")
        options["stop"] = stops
    extras = body.get("medgemma_edge")
    if extras is not None:
        if not isinstance(extras, dict):
            raise ApiError(400, "medgemma_edge must be an object {think, window, fit, max_slices, top_k, "
                                "store_result, repetition_guard}", "medgemma_edge")
        unknown = set(extras) - {"think", "window", "fit", "max_slices", "top_k", "store_result", "repetition_guard"}
        if unknown:
            raise ApiError(400, f"medgemma_edge.{sorted(unknown)[0][:40]} is not an option — use think, window, fit, "
                                "max_slices, top_k, store_result or repetition_guard", "medgemma_edge")
        options.update(image_options(extras, "medgemma_edge."))
        if extras.get("think") is not None:
            options["think"] = _flag(extras["think"], "medgemma_edge.think")
        if extras.get("top_k") is not None:
            options["top_k"] = _integer(extras["top_k"], "medgemma_edge.top_k", least=0)
        if extras.get("repetition_guard") is not None:
            options["repetition_guard"] = _flag(extras["repetition_guard"], "medgemma_edge.repetition_guard")
    return options


def _message(message, i: int, uploads, request: ChatRequest, fits: set, node=None) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{where} must be an object {{role, content}}", where)
    role = _ROLES.get(message.get("role"))
    if role is None:
        raise ApiError(400, f"{where}.role must be system, user or assistant", f"{where}.role")
    content = message.get("content")
    if content is None:
        content = ""
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be text or a list of parts", f"{where}.content")
    items, series, series_at, prior = [], [], None, None
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{param}.text must be a string", f"{param}.text")
            items.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            prior_at = len(items) if prior_flag(part, param) else None
            if isinstance(url, str) and url.startswith(UPLOAD_SCHEME):
                items.append(_upload_item(url, uploads, param, request, fits))
            elif isinstance(url, str) and url.startswith((STUDY, SERIES)):
                items += _study_items(url, node, param, request)
            else:
                mime, data = decode_data_url(url, f"{param}.image_url.url")
                request.images += 1
                request.image_bytes += len(url)
                if is_dicom(mime, data) and prior_at is None:  # a message's DICOM parts: one series, at the first
                    if series_at is None:
                        series_at = len(items)
                        items.append(None)
                    series.append(data)
                else:
                    items.append({"type": "image", "image": data})
            if prior_at is not None:
                prior = take_prior(items, prior_at, param, request)
        elif kind == "image_dicom":
            items += _image_dicom_items(part, node, param, request)
        else:
            raise ApiError(400, f"{param} must be {{\"type\": \"text\"}} or {{\"type\": \"image_url\"}}", param)
    if series:
        items[series_at] = {"type": "image", "image": series[0] if len(series) == 1 else series}
    if prior is not None:
        items = place_prior(items, prior, where, role)
    return {"role": role, "content": items}


def _upload_item(url: str, uploads, param: str, request: ChatRequest, fits: set) -> dict:
    upload_id = url[len(UPLOAD_SCHEME):]
    upload = uploads.get(upload_id)
    if upload is None:
        raise ApiError(400, f"{param}: no uploaded image with this id (the server keeps the last "
                            f"{uploads.max_items}, in memory only) — upload it again", param)
    if upload.status == "error":
        raise ApiError(400, f"{param}: the uploaded image could not be used: {upload.error}", param)
    request.images += len(upload.pictures)
    request.uploads.append(upload_id)
    if upload.fit is not None:
        fits.add(upload.fit)
    return {"type": "image", "image": list(upload.pictures)}


def _study_items(url: str, node, param: str, request: ChatRequest) -> list[dict]:
    """The node's image items for `medgemma-edge:study/UID` or `…:series/UID` (not counted against
    max_images: they are the node's files, not the body's)."""
    if node is None:
        raise ApiError(400, f"{param}: this server has no DICOM node (start it with --dicom-port) — send the "
                            "images themselves", param)
    series = url.startswith(SERIES)
    uid = url[len(SERIES if series else STUDY):]
    try:
        study_uid, items = node.study_items(None if series else uid, uid if series else None)
    except InputError as err:
        raise ApiError(400, f"{param}: {err}", param) from None
    request.studies.append(study_uid)
    return items


def _image_dicom_items(part: dict, node, param: str, request: ChatRequest) -> list[dict]:
    """Google's `image_dicom` part: every URI on the node's --dicomweb server (pulled into the spool
    before translation); a study or series URI is its series, instance URIs of one series one item."""
    from medgemma_edge.node.dicomweb import image_dicom_sources

    if node is None or not node.config.dicomweb:
        raise ApiError(400, f"{param}: image_dicom needs a DICOM node with a DICOMweb server (serve --dicom-port "
                            "PORT --dicomweb URL)", param)
    try:
        sources = image_dicom_sources(part, node.config.dicomweb, f"{param}.image_dicom")
        items, instances = [], {}
        for study_uid, series_uid, sop_uid in sources:
            if sop_uid is None:
                uid, found = node.study_items(study_uid if series_uid is None else None, series_uid)
                request.studies.append(uid)
                items += found
                continue
            inst = node.spool.get(sop_uid)
            if inst is None:
                raise InputError(f"{param}: the instance is not on this node")
            if series_uid not in instances:
                instances[series_uid] = []
                items.append({"type": "image", "image": instances[series_uid]})
                request.studies.append(inst.study_uid)
            instances[series_uid].append(str(inst.path))
    except InputError as err:
        message = str(err) if str(err).startswith(param) else f"{param}: {err}"
        raise ApiError(400, message, param) from None
    return items


def _integer(value, param: str, *, least: int | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (least is not None and value < least):
        raise ApiError(400, f"{param} must be an integer" + (f" ≥ {least}" if least is not None else ""), param)
    return value


def _flag(value, param: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{param} must be true or false", param)
    return value
