"""Strict JSON: read a body the one way every conforming parser reads it, or refuse it.

The proxy judges the body it parsed and forwards the *bytes*; any text two parsers read
differently is a way past the guard. Python's ``json`` is lenient where others are not, so
this module refuses, following I-JSON (RFC 7493) and RFC 8259:

* duplicate object keys (``{"content": <injection>, "content": "hi"}``): Python keeps the
  last, other parsers the first or refuse; at any depth;
* bytes that are not UTF-8, or UTF-8 with a byte order mark: ``json.loads(bytes)`` would
  guess UTF-16/32 and skip a BOM, and decodes UTF-8-encoded surrogates ("surrogatepass");
* escaped lone surrogates (``"\\ud800"``): Python keeps an unpaired surrogate that other
  parsers replace with U+FFFD or refuse, and no UTF-8 encoder can send on;
* ``NaN``, ``Infinity``, ``-Infinity`` (not JSON) and numbers that overflow a double
  (``1e400``, which Python reads as infinity).

Integers are exact in Python at any length up to its 4300-digit limit (longer ones are
refused as invalid JSON). Nothing here knows about HTTP: ``JsonRejected`` carries a
machine-readable ``kind`` that the API turns into a 422.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Longest duplicate key echoed back in an error (the client's own text, never logged).
MAX_KEY_ECHO = 64
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
# Only a \uD800-\uDFFF escape can produce a surrogate once the bytes are strict UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonRejected(ValueError):
    """A body refused by the strict reading; ``kind`` names the rule (``json_duplicate_key``...)."""

    def __init__(self, kind: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = details or {}


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonRejected(
                    "json_duplicate_key",
                    "request body has a duplicate object key (parsers disagree on which value counts)",
                    {"key": key[:MAX_KEY_ECHO]},
                )
            seen.add(key)
    return obj


def _constant(name: str) -> Any:
    raise JsonRejected("json_non_finite", f"{name} is not a JSON value")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JsonRejected("json_non_finite", "a number overflows a double (it would read as infinity)")
    return value


def _has_lone_surrogate(doc: Any) -> bool:
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def loads(raw: bytes) -> Any:
    """The JSON document in ``raw``; JsonRejected if it is not one (strictly, see the module doc)."""
    if raw.startswith(_BOMS) or b"\x00" in raw:
        raise JsonRejected("json_not_utf8", "request body must be JSON in UTF-8 without a byte order mark")
    try:
        text = raw.decode("utf-8")  # strict: no surrogates, no invalid sequences
    except UnicodeDecodeError as exc:
        raise JsonRejected("json_not_utf8", "request body must be JSON in UTF-8", {"position": exc.start}) from None
    try:
        doc = json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_float)
    except JsonRejected:
        raise
    except json.JSONDecodeError as exc:
        raise JsonRejected(
            "json_invalid", f"request body is not valid JSON: {exc.msg}", {"position": exc.pos}
        ) from None
    except RecursionError:
        raise JsonRejected("json_invalid", "request body is nested too deeply") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise JsonRejected("json_invalid", f"request body is not valid JSON: {str(exc)[:200]}") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(doc):
        raise JsonRejected("json_lone_surrogate", "request body has an unpaired UTF-16 surrogate escape")
    return doc
