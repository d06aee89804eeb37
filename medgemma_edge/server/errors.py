"""Errors in OpenAI's shape, and which status each of our exceptions earns.

Bodies and log lines carry our own one-line messages only: an unexpected exception's text could
quote a DICOM value or the prompt, so it is replaced by a generic message and logged by type name.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from medgemma_edge.runtime.errors import BundleError, BusyError, InputError, MedGemmaEdgeError

log = logging.getLogger("medgemma_edge.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 421: "invalid_request_error",
         429: "rate_limit_error",
         500: "server_error", 502: "server_error", 503: "server_error"}
INTERNAL = "internal server error — the server log names the failure; the request was not answered"


class UpstreamError(MedGemmaEdgeError):
    """The upstream engine is unreachable, failed, or refused our configuration (key, URL, model
    name): not the client's fault, a bad gateway (HTTP 502). Raised by server/upstream.py."""


class ApiError(Exception):
    """A request the server refuses, with the status and message the client gets."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": None}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None):
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def as_api_error(err: BaseException, retry_after: int = 1) -> ApiError:
    """The ApiError a client sees for `err` (logged here when it is our own fault)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, InputError):
        return ApiError(400, str(err))
    if isinstance(err, BusyError):  # the model is held by a caller outside this server
        return ApiError(429, str(err), headers={"Retry-After": str(retry_after)})
    if isinstance(err, UpstreamError):  # the engine behind us failed: a bad gateway, not the client's fault
        log.error("upstream engine failed (its message went to the client: it may quote the request)")
        return ApiError(502, str(err))
    if isinstance(err, BundleError):
        log.error("bundle error: %s", err)  # about our files, never about the request
        return ApiError(500, str(err))
    if isinstance(err, MedGemmaEdgeError):
        return ApiError(400, str(err))
    log.error("request failed: %s (message withheld: it may quote request data)", type(err).__name__)
    return ApiError(500, INTERNAL)


def response_for(err: BaseException, retry_after: int = 1) -> JSONResponse:
    api = as_api_error(err, retry_after)
    return error_response(api.status, api.message, api.param, api.headers)
