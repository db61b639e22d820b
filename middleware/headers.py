"""Raw ASGI header access for middleware on the hot path of every request.

Starlette's ``Headers``/``MutableHeaders`` wrap the header list in an object and scan it
again for every lookup or assignment; layers that read one header or add a fixed few pay
that on every request. These helpers do the one scan they need over the raw
``(name, value)`` byte pairs, whose names ASGI servers give in lower case.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Message, Scope

Pair = tuple[bytes, bytes]


def encode_pairs(headers: Iterable[tuple[str, str]]) -> tuple[Pair, ...]:
    """Header names lower-cased and both sides encoded, as ASGI messages carry them."""
    return tuple(
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers
    )


def request_header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower case bytes), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def set_response_headers(message: Message, pairs: Iterable[Pair]) -> None:
    """Replace or add ``pairs`` in an ``http.response.start`` message.

    A new list is built rather than the message's own list edited: responses built once and
    sent many times (a shared refusal) hand the same list to every message.
    """
    pairs = tuple(pairs)
    names = {name for name, _ in pairs}
    message["headers"] = [
        *(pair for pair in message.get("headers", ()) if pair[0].lower() not in names),
        *pairs,
    ]
