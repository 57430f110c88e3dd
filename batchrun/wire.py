"""What may go on the wire, checked before anything is sent: the API key, the
header values (from the job or from environment variables), and the base URL.
A CR or LF in a key mounted from a file, a bad port or plain http to another
machine is a clear error naming where it came from — never a traceback from
the HTTP client, and never the secret itself."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from batchrun.errors import JobError

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP header name (RFC 9110 token)."""


def _control_at(text: str, allowed: str = "") -> int | None:
    """The position of the first control character in ``text`` not in ``allowed``."""
    for i, char in enumerate(text):
        if (char < " " or char == "\x7f") and char not in allowed:
            return i
    return None


def check_headers(headers: Mapping[str, Any], source: str) -> None:
    """Every ``[headers]`` entry is a valid name with a string value HTTP can
    carry, and none is Authorization (the key is batchrun's to send)."""
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise JobError(
                f"Header name {name!r} in {source} is not a valid HTTP header name: use letters, "
                "digits and - (e.g. X-Tenant-Id), with no space, colon or control character."
            )
        if not isinstance(value, str):
            raise JobError(f"Header `{name}` in {source} must be a string, not {value!r}.")
        if name.lower() == "authorization":
            raise JobError(
                f"`headers` in {source} sets Authorization: batchrun sends the key from `api_key_env` itself."
            )
        check_header_value(name, value, source)


def check_header_value(name: str, value: str, source: str) -> str:
    """``value`` when HTTP can carry it (a tab aside, no control character: a CR
    or LF would end the header); JobError naming the header otherwise. The
    value itself is not shown: it may hold a secret."""
    at = _control_at(value, allowed="\t")
    if at is not None:
        raise JobError(
            f"Header `{name}` in {source} holds a control character ({value[at]!r} at position {at}), "
            "which HTTP cannot send. Remove it from the value (or from the environment variable "
            "the value names)."
        )
    return value


def clean_secret(value: str, what: str) -> str:
    """``value`` (a key or header value from an environment variable) without
    surrounding whitespace — a key mounted from a file ends with a newline —
    with a warning when there was some. ``what`` names its source in the
    warning ("the API key in $VAR"); the value is never shown."""
    stripped = value.strip()
    if stripped != value:
        logging.getLogger("batchrun").warning(
            "%s has surrounding whitespace (a trailing newline?); batchrun strips it.",
            what,
            extra={"event": "secret_stripped"},
        )
    return stripped


def clean_api_key(variable: str, key: str) -> str:
    """The API key from ``$variable``, stripped (see ``clean_secret``). JobError,
    naming the variable but never the key, when it holds a control character
    HTTP cannot send or nothing but whitespace."""
    key = clean_secret(key, f"The API key in ${variable}")
    if not key:
        raise JobError(
            f"No API key: the environment variable {variable} holds only whitespace. Put the key in it "
            f'(export {variable}=...), or set api_key_env = "" for a server that needs none.'
        )
    at = _control_at(key)
    if at is not None:
        raise JobError(
            f"The API key in ${variable} holds a control character ({key[at]!r} at position {at}), "
            f"which an HTTP header cannot carry. Check how {variable} is set (a key file with Windows "
            "line endings, two keys on two lines?) and put the key alone in it."
        )
    return key


def check_base_url(base_url: str, allow_insecure_http: bool) -> None:
    """JobError unless ``base_url`` is an http(s) URL with a host (and a valid
    port) that aiohttp can open; plain http only to this machine unless
    ``allow_insecure_http``: the key would travel in clear."""
    example = "Use e.g. https://api.llmtune.io/v1 or http://127.0.0.1:8000/v1."
    at = _control_at(base_url)
    if at is not None or " " in base_url:
        raise JobError(
            f"`base_url` {base_url!r} holds a space or control character, which a URL cannot. {example}"
        )
    try:
        parts = urlsplit(base_url)
        port = parts.port
    except ValueError as exc:
        raise JobError(
            f"`base_url` {base_url!r} is not a valid URL ({exc}). A port is a number from 1 to "
            f"65535; an IPv6 host is written in brackets. {example}"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobError(f"`base_url` {base_url!r} is not an http(s) URL with a host. {example}")
    if port == 0:
        raise JobError(
            f"`base_url` {base_url!r} has port 0; a port is a number from 1 to 65535. {example}"
        )
    from yarl import URL

    try:
        URL(base_url).origin()
    except ValueError as exc:
        raise JobError(f"`base_url` {base_url!r} is not a valid URL ({exc}). {example}") from None
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        raise JobError(
            f"`base_url` {base_url} is plain http:// to {parts.hostname}, which is not this machine: the API key "
            "would travel in clear. Use https://, or pass --allow-insecure-http if the network is trusted."
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
