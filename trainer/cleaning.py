"""Text cleaning for training records: Unicode/whitespace normalisation, PII masking, duplicate keys.

Pure string functions, no torch, no tokenizer: `tunerun.trainer.data` applies them to every message.

PII masking is pattern-based (emails, phone numbers, IPv4 addresses, IBANs, payment card numbers) and errs
on the side of precision: IBANs must pass the ISO 7064 mod-97 check and card numbers the Luhn check, so an
order number or a random 16-digit id is left alone. It is not a substitute for a named-entity PII scanner.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

PII_KINDS = ("email", "phone", "ip_address", "iban", "credit_card")
PLACEHOLDERS = {kind: f"<{kind.upper()}>" for kind in PII_KINDS}

_INNER_BLANKS = re.compile(r"(?<=\S)[ \t\f\v\u00a0]{2,}|(?<=\S)[\t\f\v\u00a0]")
_TRAILING_BLANKS = re.compile(r"[ \t\f\v\u00a0]+$", re.MULTILINE)
_PUNCTUATION = re.compile(r"[^\w\s]")

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w]|[.-]\d)")


def normalize_text(text: str) -> str:
    """NFKC, then whitespace: strip, collapse runs of spaces/tabs inside a line, keep newlines.

    Leading indentation of each line is kept as written: alpaca-style answers contain code, where it is
    meaning, not noise.
    """
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_BLANKS.sub("", text)
    return _INNER_BLANKS.sub(" ", text).strip()


def exact_key(parts: list[str]) -> str:
    """Key for exact duplicates: the normalised texts themselves (the caller normalises first)."""
    return "\x1f".join(parts)


def near_key(parts: list[str]) -> str:
    """Key for near duplicates: casefolded, punctuation deleted, whitespace collapsed.

    This only catches copies that differ in case, punctuation or spacing; MinHash-based near-dedup
    (reworded copies) comes in a later issue.
    """
    return "\x1f".join(" ".join(_PUNCTUATION.sub("", p.casefold()).split()) for p in parts)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _card_ok(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and _luhn_ok(digits)


def _phone_ok(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    if not 9 <= len(digits) <= 15:  # fewer is a date, a time or an amount more often than a phone
        return False
    if any(ch in candidate for ch in "+(-."):
        return True
    # Space-separated digits only: accept the common 3-3-4 layout, not a list of numbers like years.
    return [len(g) for g in candidate.split()] == [3, 3, 4]


# Order matters: emails first (they contain dots and digits), IBANs and cards before phones (a phone
# pattern would eat part of a card number), IPs before phones (dotted digits).
_RULES: list[tuple[str, re.Pattern, Callable[[str], bool]]] = [
    ("email", EMAIL, lambda _: True),
    ("iban", IBAN, _iban_ok),
    ("credit_card", CARD, _card_ok),
    ("ip_address", IPV4, lambda _: True),
    ("phone", PHONE, _phone_ok),
]


def mask_pii(text: str, counts: dict[str, int]) -> str:
    """Replace PII in ``text`` with placeholders such as ``<EMAIL>``; adds what it masked to ``counts``."""
    for kind, pattern, valid in _RULES:
        def replace(match: re.Match, kind=kind, valid=valid) -> str:
            if not valid(match.group(0)):
                return match.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text
