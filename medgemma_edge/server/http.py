"""HTTP plumbing the routes share: a request's JSON body, and noticing a client that left."""

from __future__ import annotations

import asyncio
import json

from medgemma_edge.server.errors import ApiError
from medgemma_edge.server.worker import Job, Worker

# Deeper than any OpenAI request or JSON schema a client sends (a request is ~6 levels, a
# tool's schema a few more), and shallow enough that every recursive walk after parsing (tools,
# schema → grammar) stays far from Python's recursion limit.
MAX_JSON_DEPTH = 64


async def read_json(request):
    """The body as JSON; 400 saying so when it is not, or when it nests deeper than MAX_JSON_DEPTH."""
    body = await request.body()
    try:
        value = json.loads(body)
        too_deep = _deeper_than(value, MAX_JSON_DEPTH)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON — send Content-Type: application/json with a JSON "
                            "object") from None
    except RecursionError:  # the parser recurses once per level: thousands of `[` would be a 500
        too_deep = True
    if too_deep:
        raise ApiError(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels — no request needs that")
    return value


def _deeper_than(value, limit: int) -> bool:
    """True when containers nest more than `limit` deep (a loop, not recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def watch_disconnect(request, worker: Worker, job: Job) -> asyncio.Task:
    """Cancel `job` when the client goes away (read after the body: only http.disconnect comes)."""

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                worker.cancel(job)
                return

    return asyncio.create_task(watch())
