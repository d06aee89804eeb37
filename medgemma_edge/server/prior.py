"""A prior X-ray beside the current one in a chat request (medgemma_edge/longitudinal.py).

The client flags one image part as the prior: `{"type": "image_url", "image_url": {"url": ...},
"medgemma_edge": {"prior": true}}` (the same `medgemma_edge` extension key the body takes). Its
message must hold exactly one other image, the current X-ray; the prior is moved right before it,
so `[current, prior, text]` becomes Google's layout `[prior, current, text]`, as `ask --prior`
builds it. Each is one picture (a data: URL or an upload; a series or a multi-frame DICOM is
refused), and with a prior the chat gets no system prompt unless the client or a preset gives one.
"""

from __future__ import annotations

from medgemma_edge.longitudinal import check_one_picture
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.server.errors import ApiError


def prior_flag(part: dict, param: str) -> bool:
    """True for a part flagged as the prior; 400 for a malformed flag."""
    extras = part.get("medgemma_edge")
    if extras is None:
        return False
    if not isinstance(extras, dict) or set(extras) - {"prior"}:
        raise ApiError(400, f'{param}.medgemma_edge must be {{"prior": true}} or left out', f"{param}.medgemma_edge")
    value = extras.get("prior", False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{param}.medgemma_edge.prior must be true or false", f"{param}.medgemma_edge.prior")
    return value


def take_prior(items: list[dict], at: int, param: str, request) -> dict:
    """The prior part's item, taken out of `items` (from `at` on, where its part put it)."""
    if request.prior is not None:
        raise ApiError(400, f"{param}: a second prior image ({request.prior} is one) — flag one part as the prior",
                       param)
    taken = items[at:]
    del items[at:]
    _one_picture(taken, param)
    request.prior = param
    return taken[0]


def place_prior(items: list[dict], prior: dict, where: str, role: str) -> list[dict]:
    """The message's items with the prior right before its one current image."""
    param = f"{where}.content"
    if role != "user":
        raise ApiError(400, f"{param}: a prior image belongs in a user message", param)
    images = [k for k, item in enumerate(items) if item.get("type") == "image"]
    if len(images) != 1:
        raise ApiError(400, f"{param}: a prior needs exactly one other image in its message (the current "
                            f"X-ray), got {len(images)}", param)
    _one_picture([items[images[0]]], f"{param} (the current image)", param)
    return items[:images[0]] + [prior] + items[images[0]:]


def _one_picture(taken: list[dict], what: str, param: str | None = None) -> None:
    try:
        if len(taken) != 1:
            raise InputError(f"{what} is {len(taken)} series — give one X-ray")
        check_one_picture(taken[0].get("image"), what)
    except InputError as err:
        raise ApiError(400, str(err), param or what) from None
