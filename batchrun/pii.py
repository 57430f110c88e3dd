"""Personal data pseudonymized before a request leaves the machine, put back in the answer.

A job with ``pii`` (kinds of personal data) or ``pii_patterns`` (a team's own
identifiers, name → regular expression) has the text of every message it sends
scanned — the system prompt, the rendered template, a messages column, an
OpenAI batch request's messages — and each distinct value replaced by a
placeholder: ``<EMAIL_1>``, ``<PHONE_2>``, ``<ORDER_ID_1>``. The same value is
the same placeholder within a row; the numbers count each kind's values in
order of appearance, so the same row content always gives the same request
(and the same request hash): resume and ``--reuse`` work across nights.

The mapping (placeholder → value) of a row lives in memory only while the row
is in flight (``payload.Prepared.pii``). The answer is restored before its
journal record is written — the completion text and every string of the typed
columns, also where the model changed a placeholder's case or brackets
(``EMAIL_1``, ``<email_1>``, ``[EMAIL_1]``) — so the journal, like the output,
holds only restored answers, and a row answered before a crash needs nothing
more on resume. Errors (the server's, a schema check's) keep the placeholders.
The mapping is never logged nor written; ``batchrun plan --show-pii-map`` prints
the first rows' mappings on the terminal for an audit.

Detection, per kind, with the checks of well-kept libraries:

- ``email``: a local part, ``@``, a domain with a top-level domain of letters.
- ``phone``: Google's libphonenumber (``phonenumbers``): a run of digits and
  separators is a number when ``phonenumbers`` parses it as a valid number,
  international (``+``, ``00``) or national in ``pii_region``.
- ``card``: 13 to 19 digits, contiguous or in the usual groups, that pass the Luhn
  check (``stdnum.luhn``): a 16-digit number that fails it stays as it is.
- ``iban``: country code, check digits and account (``stdnum.iban``: country
  format and the mod-97 check).
- ``ip``: IPv4 and IPv6 addresses (``ipaddress``).

The finders are in :mod:`batchrun.pii_finders`. Speed: one regular-expression
pass finds every run of digits (the candidates
for phone, card, IBAN and IPv4 numbers), ``@`` and ``:`` are found with
``str.find``; only the few candidates are checked by the libraries. Where
matches overlap, a ``pii_patterns`` pattern wins, then email, IBAN, card, IP
and phone.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from batchrun import pii_finders as finders
from batchrun.errors import JobError

if TYPE_CHECKING:
    from batchrun.config import Job
    from batchrun.outputs import Record
    from batchrun.payload import Prepared

KINDS = ("email", "phone", "card", "iban", "ip")
"""The kinds ``pii`` may name."""
LIBRARIES = {"phone": "phonenumbers", "card": "stdnum", "iban": "stdnum"}
"""The module each kind's check needs (the ``batchrun[pii]`` extra)."""
INSTALL_HINT = "pip install 'batchrun[pii]'"
MAP_ROWS = 5
"""How many rows ``batchrun plan --show-pii-map`` shows."""

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*")


# ---- the job keys ------------------------------------------------------------------


def check_keys(values: MutableMapping[str, Any], source: str) -> None:
    """Check ``pii``, ``pii_patterns`` and ``pii_region`` (in ``load_job``'s
    values, before the Job is built); JobError naming the key and the fix. The
    region is upper-cased, the patterns are compiled once here to be checked."""
    kinds = values["pii"]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise JobError(
            f"`pii` in {source} names {', '.join(map(repr, unknown))}: the kinds are "
            f"{', '.join(KINDS)} (your own identifiers go in [pii_patterns], name = regular expression)."
        )
    values["pii"] = tuple(dict.fromkeys(kinds))
    for name, pattern in values["pii_patterns"].items():
        _check_pattern(name, pattern, source)
    values["pii_region"] = region = str(values["pii_region"]).upper()
    missing = sorted({LIBRARIES[k] for k in values["pii"] if k in LIBRARIES} - _importable())
    if missing:
        needs = ", ".join(k for k in values["pii"] if LIBRARIES.get(k) in missing)
        raise JobError(
            f"`pii` in {source} asks for {needs}, whose checks need the Python package"
            f"{'s' if len(missing) > 1 else ''} {' and '.join(_PACKAGES[m] for m in missing)}: "
            f"{INSTALL_HINT}"
        )
    if "phone" in values["pii"]:
        import phonenumbers

        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise JobError(
                f"`pii_region` in {source} is {region!r}, which is not a region phone numbers are "
                "read for: give a two-letter country code such as US, GB or DE."
            )


_PACKAGES = {"phonenumbers": "phonenumbers", "stdnum": "python-stdnum"}


def _importable() -> set[str]:
    import importlib.util

    return {m for m in _PACKAGES if importlib.util.find_spec(m) is not None}


def _check_pattern(name: str, pattern: Any, source: str) -> None:
    where = f"`pii_patterns.{name}` in {source}"
    if not _NAME.fullmatch(name):
        raise JobError(
            f"{where}: the name {name!r} becomes the placeholder (<{name.upper()}_1>): use letters, "
            "digits and single underscores, starting with a letter (e.g. customer_number)."
        )
    if name.lower() in KINDS:
        raise JobError(
            f"{where}: {name!r} is a built-in kind; list it in `pii` instead, or give your pattern another name."
        )
    if not isinstance(pattern, str) or not pattern:
        raise JobError(
            f'{where} must be a regular expression in a string, e.g. {name} = "CUST-\\\\d{{6}}".'
        )
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise JobError(f"{where} is not a valid regular expression ({exc}).") from None
    if compiled.fullmatch(""):
        raise JobError(
            f"{where} matches an empty text, so it would replace nothing: make it match at least one character."
        )


def enabled(job: Job) -> bool:
    """Whether the job pseudonymizes anything."""
    return bool(job.pii or job.pii_patterns)


def settings(job: Job) -> dict[str, Any]:
    """The pii keys as the journal's identity keeps them (only for jobs that use them)."""
    return {
        "pii": list(job.pii),
        "pii_patterns": dict(job.pii_patterns),
        "pii_region": job.pii_region,
    }


def scanner_for(job: Job) -> Scanner | None:
    """The job's scanner (built once per set of keys), or None without pii."""
    if not enabled(job):
        return None
    return _scanner(job.pii, tuple(job.pii_patterns.items()), job.pii_region)


@functools.lru_cache(maxsize=8)
def _scanner(kinds: tuple[str, ...], patterns: tuple[tuple[str, str], ...], region: str) -> Scanner:
    return Scanner(kinds, dict(patterns), region)


# ---- finding -----------------------------------------------------------------------


class Scanner:
    """Finds a job's kinds of personal data in a text, and pseudonymizes rows."""

    def __init__(self, kinds: Iterable[str], patterns: Mapping[str, str], region: str) -> None:
        self.kinds = frozenset(kinds)
        self.patterns = [(name.upper(), re.compile(p)) for name, p in patterns.items()]
        self.labels = [kind.upper() for kind in KINDS if kind in self.kinds] + [
            label for label, _ in self.patterns
        ]
        self._digits = bool(self.kinds & {"phone", "card", "iban", "ip"})
        self._phone: Callable[[str], bool] | None = None
        if "phone" in self.kinds:
            self._phone = finders.phone_check(region)
        if self.kinds & {"card", "iban"}:
            from stdnum import iban, luhn

            self._luhn: Callable[[str], bool] = luhn.is_valid
            # A customer's number comes back in ticket after ticket.
            self._iban: Callable[[str], bool] = functools.lru_cache(maxsize=4096)(iban.is_valid)
        names = sorted(self.labels, key=len, reverse=True)
        alternatives = "|".join(re.escape(label).replace("_", "[ _-]") for label in names)
        self._placeholder = re.compile(
            rf"(?:(?P<open><<|\[\[|\{{\{{|<|\[|\{{|&lt;)\s*)?(?<![A-Za-z0-9])(?P<label>{alternatives})"
            rf"(?P<sep>[ _-]?)(?P<n>[0-9]+)(?![0-9])(?:\s*(?P<close>>>|\]\]|\}}\}}|>|\]|\}}|&gt;))?",
            re.IGNORECASE,
        )
        # The system prompt (and any text repeated across rows) is scanned once.
        self.spans = functools.lru_cache(maxsize=256)(self._spans)

    # ---- one text

    def _spans(self, text: str) -> tuple[finders.Span, ...]:
        """The values in ``text``, in order, none overlapping (priority as the module says)."""
        taken: list[finders.Span] = []
        for label, pattern in self.patterns:
            finders.accept(
                taken,
                (
                    (m.start(), m.end(), label)
                    for m in pattern.finditer(text)
                    if m.end() > m.start()
                ),
            )
        kinds = self.kinds
        if "email" in kinds and "@" in text:
            finders.accept(taken, finders.emails(text))
        if self._digits:
            finders.accept(taken, self._numbers(text, taken))
        if "ip" in kinds and text.count(":") >= 2:
            finders.accept(taken, finders.ipv6(text))
        taken.sort()
        return tuple(taken)

    def _numbers(self, text: str, taken: list[finders.Span]) -> list[finders.Span]:
        """IBAN, card, IPv4 and phone numbers among the runs of digits, in that order of checks."""
        kinds = self.kinds
        found: list[finders.Span] = []
        end = 0
        iban = "iban" in kinds
        for m in finders.DIGITS.finditer(text):
            start, stop = m.span()
            capitals = iban and start >= 2 and finders.CAPITALS.fullmatch(text, start - 2, start)
            if stop - start < 7 and not capitals:
                continue  # too short for any number but an IBAN's start ("GB82 WEST …")
            if start < end or (taken and finders.inside(taken, start)):
                continue
            span = None
            if capitals:
                span = self._iban_at(text, start - 2)
            if span is None:
                run = m.group()
                if "card" in kinds and len(run) >= 13:
                    card = finders.CARD.search(run)
                    if card is not None and self._luhn(finders.digits_only(card.group())):
                        span = (start + card.start(), start + card.end(), "CARD")
                if span is None and "ip" in kinds and "." in run:
                    ip = finders.IPV4.search(run)
                    if ip is not None and finders.is_ip(ip.group()):
                        span = (start + ip.start(), start + ip.end(), "IP")
                if span is None and self._phone is not None:
                    if start and (
                        text[start - 1] == "+" or (text[start - 1] == "(" and finders.closes(run))
                    ):
                        start -= 1
                    if self._phone(text[start:stop]):
                        span = (start, stop, "PHONE")
            if span is not None:
                found.append(span)
                end = span[1]
        return found

    def _iban_at(self, text: str, start: int) -> finders.Span | None:
        m = finders.IBAN.match(text, start)
        if m is None:
            return None
        value = m.group()
        # Greedy: it may have taken a word after the number; drop groups until it checks.
        while len(value.replace(" ", "")) >= 15:
            if self._iban(value):
                return (start, start + len(value), "IBAN")
            if " " not in value:
                return None
            value = value.rsplit(" ", 1)[0]
        return None

    # ---- rows

    def pseudonymize(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], RowPii]:
        """``messages`` with every value replaced by its placeholder (new dicts;
        the input's are left alone), and the row's mapping."""
        row = RowPii(self)
        out = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                message = {**message, "content": row.replace(content)}
            elif isinstance(content, list):
                parts = [
                    {**part, "text": row.replace(part["text"])}
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                    else part
                    for part in content
                ]
                message = {**message, "content": parts}
            out.append(message)
        row.seal()
        return out, row

    def pseudonymize_body(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], RowPii]:
        """An OpenAI batch request's body with its messages pseudonymized."""
        messages = body.get("messages")
        if not isinstance(messages, list):
            row = RowPii(self)
            row.seal()
            return dict(body), row
        pseudonymized, row = self.pseudonymize(messages)
        return {**body, "messages": pseudonymized}, row

    def scrub(self, text: str) -> str:
        """``text`` (an error about a row, to be journaled and logged) with every
        value replaced by its kind alone (``<EMAIL>``): nothing to map back."""
        spans = self.spans(text)
        if not spans:
            return text
        return _rebuild(text, spans, lambda value, label: f"<{label}>")


def _rebuild(text: str, spans: Iterable[finders.Span], name: Callable[[str, str], str]) -> str:
    parts = []
    last = 0
    for start, end, label in spans:
        parts.append(text[last:start])
        parts.append(name(text[start:end], label))
        last = end
    parts.append(text[last:])
    return "".join(parts)


# ---- one row's mapping ---------------------------------------------------------------


class RowPii:
    """One row's placeholders and the values they stand for, while the row is in
    flight. ``found``: how many distinct values were replaced; ``key``: the
    mapping as bytes, hashed into the request hash (so two rows whose requests
    differ only in their values are never taken for one another by --reuse)."""

    __slots__ = ("_by_value", "_counts", "_literal", "_scanner", "found", "key", "values")

    def __init__(self, scanner: Scanner) -> None:
        self._scanner = scanner
        self.values: dict[str, str] = {}
        """Placeholder key (``EMAIL_1``) → the value."""
        self._by_value: dict[tuple[str, str], str] = {}
        self._counts: dict[str, int] = {}
        self._literal: set[str] = set()
        self.found = 0
        self.key = b""

    def replace(self, text: str) -> str:
        spans = self._scanner.spans(text)
        if not spans:
            self._note_literal(text)
            return text
        self._note_literal(text)
        return _rebuild(text, spans, self._placeholder)

    def _note_literal(self, text: str) -> None:
        # Text that already holds a placeholder as batchrun writes it (a ticket
        # quoting one) keeps it: the values of its kind are numbered past it, and
        # it is not counted as unrestored when the answer repeats it.
        if any(label + "_" in text for label in self._scanner.labels):
            for m in self._scanner._placeholder.finditer(text):
                if m["sep"] == "_":
                    self._literal.add(_key(m))

    def _placeholder(self, value: str, label: str) -> str:
        known = self._by_value.get((label, value))
        if known is not None:
            return f"<{known}>"
        n = self._counts.get(label, 0) + 1
        while f"{label}_{n}" in self._literal:
            n += 1
        self._counts[label] = n
        key = f"{label}_{n}"
        self._by_value[(label, value)] = key
        self.values[key] = value
        return f"<{key}>"

    def seal(self) -> None:
        """The row is pseudonymized: fix its count and hash key."""
        self.found = len(self.values)
        self.key = orjson.dumps(self.values) if self.values else b""

    @property
    def counts(self) -> dict[str, int]:
        """Distinct values per kind (lower-case kind or pattern name)."""
        out: dict[str, int] = {}
        for key in self.values:
            kind = key.rsplit("_", 1)[0].lower()
            out[kind] = out.get(kind, 0) + 1
        return out

    # ---- the answer

    def restore_text(self, text: str, unrestored: set[str]) -> str:
        """``text`` with every placeholder (any case; ``<>``, ``[]``, ``{}`` or
        none) replaced by its value; the keys of those that stand for nothing in
        this row go to ``unrestored``."""
        if not text:
            return text

        def put_back(m: re.Match[str]) -> str:
            opened, closed = m["open"], m["close"]
            paired = bool(opened) and closed == _PAIRS.get(opened.lower())
            if not paired and m["sep"] != "_":
                return m.group()
            key = _key(m)
            value = self.values.get(key)
            if value is None:
                if key not in self._literal:
                    unrestored.add(key)
                return m.group()
            if paired:
                return value
            at = m.start()
            return m.group()[: m.start("label") - at] + value + m.group()[m.end("n") - at :]

        return self._scanner._placeholder.sub(put_back, text)

    def restore(self, record: Record) -> None:
        """Put the values back into a journal record's completion and typed
        values, and set its ``pii_found`` and ``pii_unrestored``."""
        unrestored: set[str] = set()
        completion = record.get("completion")
        if isinstance(completion, str):
            record["completion"] = self.restore_text(completion, unrestored)
        values = record.get("values")
        if values:
            record["values"] = self._restore_value(values, set())
        record["pii_found"] = self.found
        record["pii_unrestored"] = len(unrestored)

    def _restore_value(self, value: Any, unrestored: set[str]) -> Any:
        if isinstance(value, str):
            return self.restore_text(value, unrestored)
        if isinstance(value, list):
            return [self._restore_value(v, unrestored) for v in value]
        if isinstance(value, dict):
            return {k: self._restore_value(v, unrestored) for k, v in value.items()}
        return value

    def __repr__(self) -> str:
        # Never the values: a row's mapping must not reach a log or a traceback.
        return f"RowPii(found={self.found})"


_PAIRS = {"<": ">", "[": "]", "{": "}", "&lt;": "&gt;", "<<": ">>", "[[": "]]", "{{": "}}"}


def _key(m: re.Match[str]) -> str:
    label = re.sub(r"[ _-]", "_", m["label"]).upper()
    return f"{label}_{int(m['n'])}"


class PiiCount:
    """What ``batchrun plan`` shows of a pii job: the values the whole input
    would have replaced, per kind, and the first rows' mappings (for
    ``--show-pii-map`` only: ``text`` never shows them)."""

    def __init__(self) -> None:
        self.kinds: dict[str, int] = {}
        self.rows = 0
        self.first: list[tuple[str, dict[str, str]]] = []

    def add(self, row_id: str, row: RowPii) -> None:
        if not row.found:
            return
        self.rows += 1
        for kind, n in row.counts.items():
            self.kinds[kind] = self.kinds.get(kind, 0) + n
        if len(self.first) < MAP_ROWS:
            self.first.append((row_id, dict(row.values)))

    def counted(self, rows: Iterable[Prepared]) -> Iterator[Prepared]:
        """``rows`` as they pass, each counted."""
        for p in rows:
            if p.pii is not None:
                self.add(p.id, p.pii)
            yield p

    def text(self) -> str:
        """One line for the plan: the counts per kind."""
        if not self.rows:
            return "pii           nothing found to replace"
        order = {kind: i for i, kind in enumerate(KINDS)}
        kinds = sorted(self.kinds.items(), key=lambda item: order.get(item[0], len(order)))
        counts = ", ".join(f"{kind} {n:,}" for kind, n in kinds)
        return (
            f"pii           {counts} (distinct values per row, summed) in {self.rows:,} rows; "
            "the first request is shown as it will be sent"
        )

    def map_text(self) -> str:
        """The first rows' placeholders and values, for an audit on the terminal."""
        lines = [
            f"pii map of the first {len(self.first)} rows with personal data "
            "(shown here only; never logged or written to a file):"
        ]
        for row_id, values in self.first:
            for i, (key, value) in enumerate(values.items()):
                lines.append(f"  {row_id if i == 0 else '':<14} <{key}> = {value}")
        return "\n".join(lines)
