"""Where ``batchrun.pii`` finds personal data in a text: the regular expressions
of the candidates and the checks each kind's candidates pass (the libraries'
where there is one). Each finder returns spans ``(start, end, LABEL)``."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any

Span = tuple[int, int, str]
"""(start, end, label) of one value in a text."""

DIGITS = re.compile(r"[0-9][0-9 \-./()]*[0-9]")
"""A run of digits with the separators numbers are written with: the candidates
for phone, card, IBAN and IPv4 (one pass; a pattern starting with a character
class is scanned in C)."""
CARD = re.compile(
    r"(?<![0-9])(?:[0-9]{13,19}|[0-9]{4}([ \-])[0-9]{4}\1[0-9]{4}\1[0-9]{1,7}"
    r"|[0-9]{4}([ \-])[0-9]{6}\2[0-9]{4,5})(?![0-9])"
)
"""Card numbers as they are written: contiguous, 4-4-4-4(-3) or Amex's 4-6-5."""
IPV4 = re.compile(r"(?<![0-9.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?![0-9]|\.[0-9])")
CAPITALS = re.compile(r"[A-Z]{2}")
IBAN = re.compile(r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}")
LOCAL_PART = re.compile(r"[\w.%+\-]{1,64}\Z")
DOMAIN = re.compile(r"[\w\-]{1,63}(?:\.[\w\-]{1,63})*\.[^\W\d_]{2,63}")
HEX = frozenset("0123456789abcdefABCDEF:.")


def closes(run: str) -> bool:
    """Whether a run of digits closes a bracket opened before it: ``415) 555-0132``."""
    close = run.find(")")
    return close > 0 and "(" not in run[:close]


def digits_only(text: str) -> str:
    return text.replace(" ", "").replace("-", "")


def accept(taken: list[Span], spans: Iterable[Span]) -> None:
    """Add the ``spans`` that overlap none already taken."""
    new = [s for s in spans if not any(s[0] < t[1] and t[0] < s[1] for t in taken)]
    taken.extend(new)


def inside(taken: list[Span], position: int) -> bool:
    return any(t[0] <= position < t[1] for t in taken)


def emails(text: str) -> list[Span]:
    found = []
    at = text.find("@")
    while at > 0:
        local = LOCAL_PART.search(text, max(0, at - 64), at)
        domain = DOMAIN.match(text, at + 1)
        if local is not None and domain is not None:
            start = local.start()
            while start < at and text[start] == ".":
                start += 1
            if start < at:
                found.append((start, domain.end(), "EMAIL"))
                at = domain.end()
        at = text.find("@", at + 1)
    return found


def ipv6(text: str) -> list[Span]:
    """IPv6 addresses: from each ``:`` between hex digits (or ``::``), the run of
    hex digits, colons and dots around it, if ``ipaddress`` takes it."""
    found = []
    i = text.find(":")
    n = len(text)
    while i >= 0:
        start = i
        while start > 0 and text[start - 1] in HEX:
            start -= 1
        end = i
        while end < n and text[end] in HEX:
            end += 1
        while end > start and text[end - 1] in ".:" and text[end - 2 : end] != "::":
            end -= 1
        candidate = text[start:end]
        if candidate.count(":") >= 2 and is_ip(candidate):
            found.append((start, end, "IP"))
        i = text.find(":", max(end, i + 1))
    return found


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def phone_check(region: str) -> Callable[[str], bool]:
    """Whether a run of digits is a phone number, international or in ``region``:
    libphonenumber parses it, and its national number has a length and digits
    that the metadata of its country allows. (``is_valid_number`` would also
    find its type, fixed line or mobile, trying one pattern after another: three
    times the cost, for a distinction batchrun does not need.) The lengths
    ``region`` allows rule out most other numbers (dates, order numbers)
    before the parse."""
    import phonenumbers
    from phonenumbers import PhoneMetadata

    def lengths_of(meta: Any) -> frozenset[int]:
        desc = meta.general_desc if meta is not None else None
        return frozenset(desc.possible_length if desc is not None else ())

    home = PhoneMetadata.metadata_for_region(region)
    lengths = lengths_of(home)
    prefix = (home.national_prefix or "") if home is not None else ""
    # A national number of a region whose national prefix is a plain digit string
    # (US, DE, FR, IN, …) needs no parse: its digits, without that prefix, are
    # its national number. Others (GB, AR, BR, JP have rules) are parsed.
    plain = (
        home is not None
        and home.national_prefix_transform_rule is None
        and home.national_prefix_for_parsing in (None, "", prefix)
    )
    abroad = re.compile(home.international_prefix) if home and home.international_prefix else None
    patterns: dict[str, tuple[frozenset[int], re.Pattern[str] | None]] = {}

    def pattern_of(code: str, country_code: int) -> tuple[frozenset[int], re.Pattern[str] | None]:
        if code not in patterns:
            meta = (
                PhoneMetadata.metadata_for_nongeo_region(country_code)
                if code == "001"
                else PhoneMetadata.metadata_for_region(code)
            )
            desc = meta.general_desc if meta is not None else None
            text = desc.national_number_pattern if desc is not None else None
            patterns[code] = (lengths_of(meta), re.compile(text) if text else None)
        return patterns[code]

    def check(candidate: str) -> bool:
        digits = "".join(c for c in candidate if c.isdigit())
        n = len(digits)
        if candidate[0] == "+" or candidate.startswith("00"):
            if not 8 <= n <= 17:
                return False
        elif n in lengths or (prefix and digits.startswith(prefix) and n - len(prefix) in lengths):
            if plain and not (abroad and abroad.match(digits)):
                allowed, pattern = pattern_of(region, 0)
                if pattern is None:
                    return False
                # As parse does: the national prefix goes when what is left is a number.
                stripped = digits[len(prefix) :] if prefix and digits.startswith(prefix) else None
                return any(
                    national is not None
                    and len(national) in allowed
                    and pattern.fullmatch(national) is not None
                    for national in (stripped, digits)
                )
        else:
            return False
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            return False
        national = phonenumbers.national_significant_number(number)
        country_code = number.country_code or 0
        for code in phonenumbers.region_codes_for_country_code(country_code):
            allowed, pattern = pattern_of(code, country_code)
            if (
                pattern is not None
                and (not allowed or len(national) in allowed)
                and pattern.fullmatch(national)
            ):
                return True
        return False

    return functools.lru_cache(maxsize=4096)(check)
