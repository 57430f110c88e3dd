"""The JSON-Schema instance generator of the embedded endpoint: :class:`_Instance`
derives a deterministic instance of a schema from a message text (its extractive
summary, words and keywords), for the structured answers of :mod:`.answers`.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import math
import re
import string
import uuid
from typing import Any, Final

_SENTENCE_SPLIT_RE: Final = re.compile(r"(?<=[.!?])\s+")
_WORD_RE: Final = re.compile("\\w+(?:['\u2019]\\w+)*")  # words, with apostrophes
# Words (of the lower-cased text) that make urgency-like integers high or low and
# booleans true. Set lookups: a regex alternation scan costs several times more.
_HIGH_URGENCY_WORDS: Final = frozenset(
    [
        "urgent",
        "urgently",
        "urgency",
        "asap",
        "emergency",
        "critical",
        "immediately",
        "outage",
        "outages",
        "down",
        "broken",
        "crash",
        "crashed",
        "crashes",
        "crashing",
        "blocked",
        "blocking",
    ]
)
_LOW_URGENCY_WORDS: Final = frozenset(
    [
        "whenever",
        "minor",
        "suggestion",
        "suggestions",
        "suggest",
        "idea",
        "ideas",
        "wish",
        "curious",
    ]
)
_LOW_URGENCY_PHRASES: Final = ("no rush", "nice to have")
_PUNCTUATION_TO_SPACE: Final = str.maketrans(
    dict.fromkeys(string.punctuation + "\u2018\u2019\u201c\u201d", " ")
)
_FLAG_WORDS: Final = frozenset(
    [
        "urgent",
        "urgently",
        "asap",
        "refund",
        "refunds",
        "refunded",
        "angry",
        "angrily",
        "furious",
        "cancel",
        "cancels",
        "cancelled",
        "canceled",
        "cancelling",
        "canceling",
        "cancellation",
        "chargeback",
        "chargebacks",
        "lawyer",
        "lawyers",
        "lawsuit",
        "unacceptable",
        "escalate",
        "escalated",
        "escalation",
    ]
)
_URGENCY_NAME_RE: Final = re.compile(r"urgen|priorit|severit|importan", re.IGNORECASE)
_TITLE_NAME_RE: Final = re.compile(r"title|subject|headline", re.IGNORECASE)
_NULL_CHANCE: Final = 0.125  # how often a nullable value is null
_MAX_DEPTH: Final = 32  # schemas nested deeper get strings, instead of a RecursionError
_INT_LIMIT: Final = 2**63 - 1  # orjson writes 64-bit integers only
_FIRST_DAY: Final = datetime.date(2024, 1, 1)  # dates for "format": "date" are in 2024


def _summary_of(text: str) -> str:
    """Return the extractive summary of ``text``: its first two sentences.

    ``text`` is whitespace-normalised and split into sentences after ``.``, ``!`` or ``?``.
    """
    normalised = " ".join(text.split())
    sentences = _SENTENCE_SPLIT_RE.split(normalised) if normalised else []
    return " ".join(sentences[:2])


def _int_or_none(value: Any) -> int | None:
    """Return ``value`` if it is an int (not a bool), else ``None``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number_or_none(value: Any) -> float | None:
    """Return ``value`` if it is an int or float (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _integer_bounds(schema: dict[str, Any]) -> tuple[int, int]:
    """Return the inclusive integer range allowed by ``schema``'s (exclusive) minimum/maximum.

    Without bounds 1..5; with one bound, the four integers next to it as well. Clamped
    to the 64-bit range orjson can write.
    """
    low: int | None = None
    high: int | None = None
    minimum = _number_or_none(schema.get("minimum"))
    if minimum is not None:
        low = math.ceil(minimum)
    exclusive = _number_or_none(schema.get("exclusiveMinimum"))
    if exclusive is not None:
        low = max(low, math.floor(exclusive) + 1) if low is not None else math.floor(exclusive) + 1
    maximum = _number_or_none(schema.get("maximum"))
    if maximum is not None:
        high = math.floor(maximum)
    exclusive = _number_or_none(schema.get("exclusiveMaximum"))
    if exclusive is not None:
        high = min(high, math.ceil(exclusive) - 1) if high is not None else math.ceil(exclusive) - 1
    if low is None and high is None:
        return 1, 5
    if low is None:
        low = high - 4 if high is not None else 1
    if high is None:
        high = low + 4
    low = min(max(low, -_INT_LIMIT), _INT_LIMIT)
    high = min(max(high, low), _INT_LIMIT)
    return low, high


def _fit(value: str, min_length: int, max_length: int | None) -> str:
    """Make ``value`` between ``min_length`` and ``max_length`` characters long.

    Too long: cut to ``max_length``, backing up to the end of the last whole word if the
    cut fell inside one (unless that would go below ``min_length``). Too short: repeat
    it (or ``"n/a"`` if empty), space-separated, and cut to ``min_length``.
    """
    if max_length is not None and len(value) > max_length >= 0:
        cut = value[:max_length]
        space = cut.rfind(" ")
        if value[max_length] != " " and space >= max(min_length, 1):
            cut = cut[:space]
        stripped = cut.rstrip()
        value = stripped if len(stripped) >= min_length else cut
    if len(value) < min_length:
        base = value or "n/a"
        value = " ".join([base] * (min_length // (len(base) + 1) + 1))[:min_length]
    return value


@functools.lru_cache(maxsize=4096)
def _enum_pattern(value: str) -> tuple[str, re.Pattern[str]] | None:
    """Return ``(needle, regex)`` finding ``value`` as whole words in a lower-cased text.

    Spaces, ``_`` and ``-`` in ``value`` match any run of them or nothing, and a plural
    ``s``/``es`` is optional, so ``"feature_request"`` finds "feature requests" and
    ``"integrations"`` finds "integration". ``needle`` is a substring every match
    contains, for a cheap check before the regex search. ``None`` if ``value`` has
    nothing to find.
    """
    parts = [part for part in re.split(r"[\s_-]+", value.lower()) if part]
    if not parts:
        return None
    if len(parts[-1]) > 3 and parts[-1][-1] == "s":
        parts[-1] = parts[-1][:-1]
    body = r"[\s_-]*".join(map(re.escape, parts))
    return parts[0], re.compile(r"(?<!\w)" + body + r"(?:e?s)?(?!\w)")


def _is_null_schema(schema: Any) -> bool:
    """Whether ``schema`` allows only ``null`` (``{"type": "null"}`` or ``{"const": null}``)."""
    return isinstance(schema, dict) and (
        schema.get("type") == "null" or ("const" in schema and schema["const"] is None)
    )


class _Instance:
    """Derives a deterministic instance of a JSON schema from a message text.

    Every choice is drawn from ``sha256(sha256(text) + path)``, where ``path`` names the
    place of the value (like ``/tags/0``) plus the purpose of the draw, so the same text
    always gets the same instance, and a value does not change when other properties
    are added to the schema. :meth:`value` describes how each schema maps to a value.
    The features of the text are computed on first use, so a schema pays only for
    what it needs.
    """

    __slots__ = ("_keywords", "_lowered", "_seed", "_summary", "_text", "_words")

    def __init__(self, text: str) -> None:
        """Remember ``text`` and hash it (the seed of every choice)."""
        self._text = text
        self._seed = hashlib.sha256(text.encode()).digest()
        self._lowered = text.lower()  # what keywords and enum values are searched in
        self._summary: str | None = None
        self._words: list[str] | None = None
        self._keywords: tuple[bool, int] | None = None

    def _text_summary(self) -> str:
        """Return the extractive summary of the text (see :func:`_summary_of`)."""
        if self._summary is None:
            self._summary = _summary_of(self._text)
        return self._summary

    def _text_words(self) -> list[str]:
        """Return the words of the text, punctuation dropped."""
        if self._words is None:
            self._words = _WORD_RE.findall(self._text)
        return self._words

    def _text_keywords(self) -> tuple[bool, int]:
        """Return ``(flag, urgency)`` of the text.

        ``flag``: whether it has words like "urgent", "refund", "angry", "cancel".
        ``urgency``: 2 if it has words like "urgent", "asap", "down", "outage"; else 0
        if it has words like "minor", "whenever", "suggestion", "no rush"; else 1.
        """
        if self._keywords is None:
            words = frozenset(self._lowered.translate(_PUNCTUATION_TO_SPACE).split())
            if not _HIGH_URGENCY_WORDS.isdisjoint(words):
                urgency = 2
            elif not _LOW_URGENCY_WORDS.isdisjoint(words) or any(
                phrase in self._lowered for phrase in _LOW_URGENCY_PHRASES
            ):
                urgency = 0
            else:
                urgency = 1
            self._keywords = (not _FLAG_WORDS.isdisjoint(words), urgency)
        return self._keywords

    def _digest(self, path: str) -> bytes:
        """Return the SHA-256 the choice named ``path`` is drawn from."""
        return hashlib.sha256(self._seed + path.encode()).digest()

    def _below(self, path: str, n: int) -> int:
        """Return a deterministic integer in ``[0, n)`` for the choice named ``path``."""
        return int.from_bytes(self._digest(path), "big") % n

    def _null(self, path: str) -> bool:
        """Whether the nullable value at ``path`` is null (one time in eight)."""
        return int.from_bytes(self._digest(path + "#null")[:8], "big") / 2**64 < _NULL_CHANCE

    def value(
        self, schema: Any, path: str = "", name: str = "", ordinal: int = 0, depth: int = 0
    ) -> Any:
        """Return the value for ``schema`` at ``path``.

        ``name`` is the nearest property name (array items inherit their array's) and
        ``ordinal`` the index within an array. In order of precedence:

        * a non-object schema (``true``), or nesting deeper than 32, is treated as
          ``{"type": "string"}``;
        * ``const`` → that value;
        * ``enum`` → see :meth:`_enum`;
        * ``anyOf``/``oneOf`` → ``null`` one time in eight if a branch is
          ``{"type": "null"}``, else a hashed non-null branch;
        * ``type`` ``[X, "null"]`` → ``null`` one time in eight, else type ``X``;
        * no ``type`` → ``"object"`` if there are ``properties``, ``"array"`` if there
          are ``items``, else ``"string"``;
        * ``"object"`` → every property of ``properties`` (required or not, in order;
          nullable ones may be ``null``), plus ``required`` names not declared there,
          as strings;
        * ``"array"`` → ``minItems``..``maxItems`` items (default 1..3, or min..min+2)
          of ``items`` (missing: strings); ``uniqueItems`` is honoured;
        * ``"integer"`` → within (exclusive) minimum/maximum (default 1..5); if the
          property is named like urgency/priority/severity/importance, the maximum when
          the text has words like "urgent", "asap", "down", "outage", the minimum when
          it has words like "minor", "whenever", "suggestion", else a hashed value
          strictly between them (if there is room);
        * ``"number"`` → within (exclusive) minimum/maximum (default 0..1, or ten next
          to a single bound), rounded to two decimals where that stays within;
        * ``"boolean"`` → ``true`` if the text has words like "urgent", "refund",
          "angry", "cancel", else a hashed bit;
        * ``"null"`` → ``null``;
        * anything else is a string: a known ``format`` (``date``, ``date-time``,
          ``time``, ``email``, ``uri``, ``uuid``) gets a value of that format; a
          property named like "summary" gets the extractive summary of the text (see
          :func:`_summary_of`), one named like "title"/"subject" its first six words,
          any other three to five consecutive words of it (``"n/a"`` if it has none);
          then fitted to ``minLength``/``maxLength`` (see :func:`_fit`).
        """
        if depth > _MAX_DEPTH or not isinstance(schema, dict):
            return self._string({}, path, name)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self._enum(enum, path, ordinal)
        branches = schema.get("anyOf")
        if not isinstance(branches, list) or not branches:
            branches = schema.get("oneOf")
        if isinstance(branches, list) and branches:
            options = [branch for branch in branches if not _is_null_schema(branch)]
            if not options or (len(options) < len(branches) and self._null(path)):
                return None
            chosen = options[self._below(path + "#branch", len(options))]
            return self.value(chosen, path, name, ordinal, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            types = [t for t in kind if t != "null"]
            if not types or (len(types) < len(kind) and self._null(path)):
                return None
            kind = types[0]
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, name, depth)
        if kind == "integer":
            return self._integer(schema, path, name)
        if kind == "number":
            return self._number(schema, path)
        if kind == "boolean":
            return self._text_keywords()[0] or self._below(path, 2) == 1
        if kind == "null":
            return None
        return self._string(schema, path, name)

    def _enum(self, values: list[Any], path: str, ordinal: int) -> Any:
        """Pick an ``enum`` value.

        ``null`` (if listed) one time in eight; else the ``ordinal``-th of the string
        values found in the text (see :func:`_enum_pattern`), ordered by where they are
        first found; else a hashed pick among the non-null values.
        """
        options = [option for option in values if option is not None]
        if not options or (len(options) < len(values) and self._null(path)):
            return None
        found: list[tuple[int, int]] = []
        lowered = self._lowered
        for index, option in enumerate(options):
            finder = _enum_pattern(option) if isinstance(option, str) else None
            if finder is None or finder[0] not in lowered:
                continue
            match = finder[1].search(lowered)
            if match is not None:
                found.append((match.start(), index))
        if ordinal < len(found):
            found.sort()
            return options[found[ordinal][1]]
        return options[self._below(path, len(options))]

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        """Build an object: every declared property, plus undeclared required ones."""
        out: dict[str, Any] = {}
        properties = schema.get("properties")
        if isinstance(properties, dict):
            for key, sub in properties.items():
                out[key] = self.value(sub, f"{path}/{key}", key, 0, depth + 1)
        required = schema.get("required")
        if isinstance(required, list):
            for key in required:
                if isinstance(key, str) and key not in out:
                    out[key] = self._string({}, f"{path}/{key}", key)
        return out

    def _array(self, schema: dict[str, Any], path: str, name: str, depth: int) -> list[Any]:
        """Build an array of a hashed length within minItems..maxItems (default 1..3)."""
        low = _int_or_none(schema.get("minItems"))
        high = _int_or_none(schema.get("maxItems"))
        if low is None:
            low = 1 if high is None else min(1, high)
        low = max(low, 0)
        high = max(low + 2, 3) if high is None else max(high, low)
        count = low + self._below(path + "#len", high - low + 1)
        unique = schema.get("uniqueItems") is True
        items = schema.get("items")
        out: list[Any] = []
        # With uniqueItems, duplicates are skipped and a few more tries made.
        for i in range(count * 4 + 8 if unique else count):
            if len(out) == count:
                break
            item = self.value(items, f"{path}/{i}", name, i, depth + 1)
            if not unique or item not in out:
                out.append(item)
        return out

    def _integer(self, schema: dict[str, Any], path: str, name: str) -> int:
        """Pick an integer within the bounds; urgency-like names follow the text's urgency."""
        low, high = _integer_bounds(schema)
        if _URGENCY_NAME_RE.search(name):
            urgency = self._text_keywords()[1]
            if urgency == 2:
                return high
            if urgency == 0:
                return low
            if high - low >= 2:
                return low + 1 + self._below(path, high - low - 1)
        return low + self._below(path, high - low + 1)

    def _number(self, schema: dict[str, Any], path: str) -> float:
        """Pick a number within the (exclusive) bounds, two decimals where possible."""
        low = _number_or_none(schema.get("minimum"))
        high = _number_or_none(schema.get("maximum"))
        low_open = high_open = False
        exclusive = _number_or_none(schema.get("exclusiveMinimum"))
        if exclusive is not None and (low is None or exclusive >= low):
            low, low_open = exclusive, True
        exclusive = _number_or_none(schema.get("exclusiveMaximum"))
        if exclusive is not None and (high is None or exclusive <= high):
            high, high_open = exclusive, True
        if low is None and high is None:
            low, high = 0.0, 1.0
        elif low is None:
            low = high - 10.0 if high is not None else 0.0
        elif high is None:
            high = low + 10.0
        high = max(high if high is not None else low, low)
        # Stay off the bounds (5% of the span), so exclusive ones hold too.
        fraction = 0.05 + 0.9 * self._below(path, 2**53) / 2**53
        value = low + (high - low) * fraction
        rounded = round(value, 2)
        if (low < rounded if low_open else low <= rounded) and (
            rounded < high if high_open else rounded <= high
        ):
            return rounded
        return value

    def _string(self, schema: dict[str, Any], path: str, name: str) -> str:
        """Make a string: formatted, the summary, a title or a phrase; fitted to its lengths."""
        fmt = schema.get("format")
        if isinstance(fmt, str):
            formatted = self._formatted(fmt, path)
            if formatted is not None:
                return formatted
        if "summar" in name.lower():
            value = self._text_summary()
        elif _TITLE_NAME_RE.search(name):
            value = " ".join(self._text_words()[:6]) or "n/a"
        else:
            value = self._phrase(path)
        min_length = _int_or_none(schema.get("minLength")) or 0
        return _fit(value, max(min_length, 0), _int_or_none(schema.get("maxLength")))

    def _phrase(self, path: str) -> str:
        """Return three to five consecutive words of the text from a hashed start."""
        words = self._text_words()
        if not words:
            return "n/a"
        digest = self._digest(path)
        size = 3 + digest[0] % 3
        start = int.from_bytes(digest[1:9], "big") % max(1, len(words) - size + 1)
        return " ".join(words[start : start + size])

    def _formatted(self, fmt: str, path: str) -> str | None:
        """Return a hashed value of string format ``fmt``, or ``None`` for other formats."""
        digest = self._digest(path + "#format")
        n = int.from_bytes(digest[:8], "big")
        day = (_FIRST_DAY + datetime.timedelta(days=n % 366)).isoformat()
        clock = f"{(n >> 16) % 24:02d}:{(n >> 24) % 60:02d}:{(n >> 32) % 60:02d}Z"
        if fmt == "date":
            return day
        if fmt == "date-time":
            return f"{day}T{clock}"
        if fmt == "time":
            return clock
        if fmt == "email":
            return f"user{n % 10000}@example.com"
        if fmt in ("uri", "url", "uri-reference", "iri"):
            return f"https://example.com/items/{n % 100000}"
        if fmt == "uuid":
            return str(uuid.UUID(bytes=digest[:16], version=4))
        return None
