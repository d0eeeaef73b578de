"""Text cleaning for training records: Unicode/whitespace normalisation, PII masking (built-in and the
spec's own patterns), duplicate keys and MinHash signatures for fuzzy duplicates.

No torch, no tokenizer: `tunerun.trainer.data.pipeline` applies these to every message.

PII masking here is rule-based (emails, phone numbers, IPv4 addresses, IBANs, payment card numbers, street
addresses; person names where a greeting, sign-off or introduction says so, in `names`) and errs on the side
of precision: card numbers must pass the Luhn check, so an order number or a random 16-digit id is left alone.
An IBAN is masked when it passes the ISO 7064 mod-97 check, and also when it fails it but has a known
country code and exactly that country's length (a typo, a test account): counted apart, as
``iban_checksum_failed``. Names in running text and places need the named-entity pass (`ner`).
"""
from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
import zlib
from collections.abc import Callable

import numpy as np

PII_KINDS = ("email", "phone", "ip_address", "iban", "credit_card")
# Report kinds, each the placeholder's entity in lower case except this one: a bad-checksum IBAN is <IBAN> too.
IBAN_CHECKSUM_FAILED = "iban_checksum_failed"
PLACEHOLDERS = {kind: f"<{kind.upper()}>" for kind in (*PII_KINDS, "street_address")}
PLACEHOLDERS[IBAN_CHECKSUM_FAILED] = "<IBAN>"

# IBAN length per country (SWIFT's IBAN registry, release 99, 2025).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}

_INNER_BLANKS = re.compile(r"(?<=\S)[ \t\f\v\u00a0]{2,}|(?<=\S)[\t\f\v\u00a0]")
_TRAILING_BLANKS = re.compile(r"[ \t\f\v\u00a0]+$", re.MULTILINE)
_ODD_BLANKS = ("\t", "\f", "\v", "\u00a0")
_PUNCTUATION = re.compile(r"[^\w\s]")
_ASCII_PUNCTUATION = bytes(c for c in range(128) if _PUNCTUATION.match(chr(c)))
_DIGIT = re.compile(r"\d")

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# The patterns below begin with a character class, and the boundary before the match (``\b`` or a negative
# lookbehind) is checked by a lookbehind after its first character: `re` then skips to the next character of that
# class in C, where a leading assertion makes it try the whole pattern at every position (IBAN: 5.5 → 1.9 µs,
# street addresses 9 → 5, phones 11 → 5 on a 400-character text). The matches are those of the plain forms noted
# above each (tests/trainer/data/test_pii_rules.py). Not for EMAIL: its first class holds most characters.
# \b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b
IBAN = re.compile(r"[A-Z](?<!\w[A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]){11,30}\b")
# (?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])
CARD = re.compile(r"\d(?<![\w-]\d)(?:[ -]?\d){12,18}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# (?<![\w.]){_OCTET}(?:\.{_OCTET}){3}(?![\w]|\.\d): the first octet's forms go on from its first digit.
IPV4 = re.compile(r"\d(?<![\w.]\d)(?:(?<=2)5[0-5]|(?<=2)[0-4]\d|(?<=1)\d\d|(?<=[1-9])\d|)"
                  rf"(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
# A house number and a street: "221B Baker Street", "12 Main St.", "Hauptstraße 5", "Via Roma 12",
# "Rue de Rivoli 8". Street words must be capitalised; a number alone or "street" in prose is left alone.
_STREET_WORDS = r"Street|St\.?|Road|Rd\.?|Avenue|Ave\.?|Lane|Ln\.?|Drive|Dr\.?|Boulevard|Blvd\.?|Way|Court|Ct\.?|" \
                r"Place|Pl\.?|Square|Sq\.?|Terrace|Close|Crescent|Highway|Parkway"
_CAP = r"[A-ZÀ-ÖØ-Þ][a-zà-öø-ÿA-Z'-]+"
# \b\d{1,5}… | \b{_CAP}(?:straße|…) … | \b(?:Via|Viale|…) …: the first character (a digit or a capital) is read
# once, and each form goes on from what it was.
STREET_ADDRESS = re.compile(
    r"[\dA-ZÀ-ÖØ-Þ](?<!\w[\s\S])(?:"
    rf"(?<=\d)\d{{0,4}}[A-Za-z]?,? (?:{_CAP} ){{1,3}}(?:{_STREET_WORDS})(?![\w])"
    r"|(?<=[A-ZÀ-ÖØ-Þ])[a-zà-öø-ÿA-Z'-]+(?:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer)"
    r" \d{1,5}[a-z]?\b"
    r"|(?:(?<=V)(?:ia|iale)|(?<=P)iazza|(?<=C)orso|(?<=L)argo|(?<=V)icolo|(?<=R)ue|(?<=A)venue|(?<=B)oulevard"
    r"|(?<=C)alle|(?<=A)venida|(?<=R)ua) (?:(?:de|del|della|di|dei|des|du|la|le|da|do|dos) )?"
    rf"(?:{_CAP} ){{0,2}}{_CAP},? \d{{1,5}}[a-zA-Z]?\b)")
# (?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w]|[.-]\d): the first
# character decides which of the optional parts begins the match.
PHONE = re.compile(r"[+(\d](?<![\w+][+(\d])(?:(?<=\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}"
                   r"|(?<=\()\d{1,4}\)[ .-]?\d{2,4}|(?<=\d)\d{1,3})(?:[ .-]\d{2,4}){1,4}(?![\w]|[.-]\d)")


def normalize_text(text: str) -> str:
    """NFKC, then whitespace: strip, collapse runs of spaces/tabs inside a line, keep newlines.

    Leading indentation of each line is kept as written: alpaca-style answers contain code, where it is
    meaning, not noise.
    """
    if not unicodedata.is_normalized("NFKC", text):  # a quick check in C; most text already is
        text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Both patterns need two blanks in a row, a blank other than a space, or a blank ending a line: substring
    # checks at C speed skip them for most texts (the regexes, with their lookbehinds, cost ~15 µs per text).
    if "  " in text or " \n" in text or text.endswith(" ") or any(blank in text for blank in _ODD_BLANKS):
        text = _INNER_BLANKS.sub(" ", _TRAILING_BLANKS.sub("", text))
    return text.strip()


def exact_key(parts: list[str]) -> str:
    """Key for exact duplicates: the normalised texts themselves (the caller normalises first)."""
    return "\x1f".join(parts)


def near_key(near_texts: list[str]) -> str:
    """Key for near duplicates: the `near_text` of each part, joined.

    This only catches copies that differ in case, punctuation or spacing; `FuzzyIndex` finds reworded ones.
    """
    return "\x1f".join(near_texts)


def near_text(text: str) -> str:
    """Casefolded, punctuation (``[^\\w\\s]``) deleted, words separated by single spaces."""
    folded = text.casefold()
    if folded.isascii():  # the same deletion as the pattern's, by a byte translation in C: ~15× faster
        folded = folded.encode("ascii").translate(None, _ASCII_PUNCTUATION).decode("ascii")
    else:
        folded = _PUNCTUATION.sub("", folded)
    return " ".join(folded.split())


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


def _mask_iban(match: re.Match, counts: dict[str, int]) -> str:
    """An IBAN-shaped match → ``<IBAN>`` (counted as iban or iban_checksum_failed), or left as it is.

    The pattern is greedy (it may run into a following code such as "DE89… BIC X"), so a match longer than
    its country's IBAN is cut to that length and the rest kept."""
    text = match.group(0)
    length = IBAN_LENGTHS.get(text[:2])
    if length is not None:
        end, seen = 0, 0
        for end, ch in enumerate(text, start=1):
            seen += ch != " "
            if seen == length:
                break
        if seen == length:
            iban, rest = text[:end], text[end:]
            if rest[:1] in ("", " ") or not rest[:1].isalnum():
                kind = "iban" if _iban_ok(iban) else IBAN_CHECKSUM_FAILED
                counts[kind] = counts.get(kind, 0) + 1
                return PLACEHOLDERS[kind] + rest
    if _iban_ok(text):  # an unknown country, or not its length: only the checksum can vouch for it
        counts["iban"] = counts.get("iban", 0) + 1
        return PLACEHOLDERS["iban"]
    return text


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
# pattern would eat part of a card number), IPs before phones (dotted digits), street addresses last (a house
# number is no phone, but a phone's digits must not become a house number).
_RULES: list[tuple[str, re.Pattern, Callable[[str], bool]]] = [
    ("email", EMAIL, lambda _: True),
    ("credit_card", CARD, _card_ok),
    ("ip_address", IPV4, lambda _: True),
    ("phone", PHONE, _phone_ok),
    ("street_address", STREET_ADDRESS, lambda _: True),
]
RULE_KINDS = ("email", "phone", "ip_address", "iban", "credit_card", "street_address")


# The fewest digits a match of each rule holds that its check accepts: a text with fewer skips the pattern, which
# costs ~10 µs per text (one scan with a lookbehind at every position) where counting digits costs one.
_MIN_DIGITS = {"iban": 2, "credit_card": 13, "ip_address": 4, "phone": 9, "street_address": 1}
_ASCII_DIGITS = b"0123456789"


def mask_pii(text: str, counts: dict[str, int], kinds: frozenset[str] = frozenset(RULE_KINDS)) -> str:
    """Replace PII in ``text`` with placeholders such as ``<EMAIL>``; adds what it masked to ``counts``.
    ``kinds``: which of `RULE_KINDS` to look for (data.clean.pii_entities, lower case)."""
    if "@" in text and "email" in kinds:
        text = _apply("email", EMAIL, lambda _: True, text, counts)
    # Counted before the rules that remove digits: an upper bound for each of them, so no match is skipped.
    digits = _digit_count(text)
    if "iban" in kinds and digits >= _MIN_DIGITS["iban"]:  # before cards: a card pattern would eat an IBAN's digits
        text = IBAN.sub(lambda m: _mask_iban(m, counts), text)
    for kind, pattern, valid in _RULES[1:]:
        if kind in kinds and digits >= _MIN_DIGITS[kind] and (kind != "ip_address" or text.count(".") >= 3):
            text = _apply(kind, pattern, valid, text, counts)
    return text


def _digit_count(text: str) -> int:
    """Digits ``\\d`` matches; for ASCII text (``isascii`` is a flag lookup) by a byte translation in C."""
    if text.isascii():
        raw = text.encode("ascii")
        return len(raw) - len(raw.translate(None, _ASCII_DIGITS))
    return len(_DIGIT.findall(text))


def _apply(kind: str, pattern: re.Pattern, valid: Callable[[str], bool], text: str, counts: dict[str, int]) -> str:
    def replace(match: re.Match) -> str:
        if not valid(match.group(0)):
            return match.group(0)
        counts[kind] = counts.get(kind, 0) + 1
        return PLACEHOLDERS[kind]

    return pattern.sub(replace, text)


# ---------------------------------------------------------------- custom PII patterns


def custom_rules(patterns: dict[str, str]) -> list[tuple[str, re.Pattern, str]]:
    """``{EMPLOYEE_ID: regex}`` from the spec → (kind counted in the report, pattern, placeholder)."""
    return [(name.lower(), re.compile(pattern), f"<{name.upper()}>") for name, pattern in patterns.items()]


def mask_custom(text: str, rules: list[tuple[str, re.Pattern, str]], counts: dict[str, int]) -> str:
    """Apply the spec's own patterns; run before the built-in ones, which could eat part of an id."""
    for kind, pattern, placeholder in rules:
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[kind] = counts.get(kind, 0) + n
    return text


# ---------------------------------------------------------------- duplicate keys and MinHash


def digest(text: str) -> bytes:
    """16 bytes that stand for a key: dedup remembers millions of them, not the texts."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


# 64 permutations estimate a Jaccard of 0.85 within ±0.045 (1 sd); 128 would halve LSH speed for ±0.03.
MINHASH_PERMUTATIONS = 64
SHINGLE_WORDS = 3
MINHASH_SEED = 1
# (bands, rows) of `band_layout` at the spec's default threshold, as datasketch's optimiser finds them: it runs
# scipy, whose import costs a second in every process. tests/trainer/data checks them against datasketch.
_STORED_LAYOUTS = {0.85: (8, 8)}


@functools.lru_cache(maxsize=1)
def _permutations() -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``MinHash(num_perm=64, seed=1)`` permutations (its default scheme, affine32: ``a·h + b`` mod 2³²,
    ``a`` odd), drawn the way it draws them, so signatures equal those of datasketch (tests/trainer/data checks)."""
    gen = np.random.RandomState(MINHASH_SEED)
    a = gen.randint(0, 1 << 31, MINHASH_PERMUTATIONS, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, MINHASH_PERMUTATIONS, dtype=np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer, which datasketch applies to each input hash before the permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


# Odd 64-bit multipliers, one per word of a shingle, that mix the words' crc32 values into the shingle's hash.
_SHINGLE_MIX = np.random.RandomState(4).randint(0, 1 << 62, SHINGLE_WORDS, dtype=np.uint64) * np.uint64(2) + 1


def shingle_hash(shingle: bytes) -> int:
    """The 32-bit hash of one shingle (up to `SHINGLE_WORDS` words, space-separated): the crc32 of each word (0 for
    a missing one) mixed by `_SHINGLE_MIX` and MurmurHash3's 64-bit finalizer, top half. This is datasketch's
    ``hashfunc`` for the signatures `minhash_signatures` computes (tests/trainer/data checks), written for one
    shingle; there, each word is hashed once for the up to three shingles it is part of."""
    words = [zlib.crc32(word) for word in shingle.split()] + [0] * SHINGLE_WORDS
    mixed = sum(c * int(m) for c, m in zip(words, _SHINGLE_MIX)) % (1 << 64)
    return int(_fmix64(np.array([mixed], dtype=np.uint64))[0] >> np.uint64(32))


def minhash_signatures(texts: list[str]) -> np.ndarray:
    """MinHash of the word 3-grams of each text (already near-normalised: words separated by single spaces, no other
    whitespace): one row of 64 uint32 hash values each. A text of fewer than 3 words is one shingle.

    The values are those of datasketch's ``MinHash(num_perm=64, seed=1, hashfunc=shingle_hash)`` fed the set of
    UTF-8 shingles, computed for many texts in one numpy pass: datasketch builds a sketch object per text, which
    cost more than the hashing, and joining and hashing each shingle's text in Python cost more than the rest.
    """
    if not texts:
        return np.empty((0, MINHASH_PERMUTATIONS), dtype=np.uint32)
    words, shingles, firsts = _shingle_layout(texts)
    mixed = sum(words[shingles + i] * _SHINGLE_MIX[i] for i in range(SHINGLE_WORDS))  # wraps: mod 2⁶⁴
    hashes = (_fmix64(mixed) >> np.uint64(32)).astype(np.uint32)
    a, b = _permutations()
    # A list, not a set: a repeated shingle cannot change a minimum. Permutations along rows and shingles along
    # columns: the minimum over each text's run of columns is 8× faster than over runs of rows.
    permuted = np.multiply.outer(a, _fmix32(hashes))  # wraps: mod 2³²
    permuted += b[:, None]
    return np.ascontiguousarray(np.minimum.reduceat(permuted, firsts, axis=1).T)


def _shingle_layout(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The word crc32s of all ``texts``, each text's followed by `SHINGLE_WORDS` zeros; where each shingle starts in
    them (a text of fewer words than a shingle has one, padded); where each text's shingles start. In numpy over
    all texts at once: a Python loop over texts and words cost 20 µs per record, 90 % of the MinHash."""
    encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
    joined = np.frombuffer(b" ".join(encoded), dtype=np.uint8)
    text_ends = np.cumsum([len(e) + 1 for e in encoded])  # each text's end in ``joined``, its space included
    blank = _ASCII_BLANK[joined]  # where `bytes.split` splits
    begins = np.flatnonzero(~blank & np.concatenate(([True], blank[:-1])))
    ends = np.flatnonzero(~blank & np.concatenate((blank[1:], [True]))) + 1
    hashes = _crc32s(joined, begins, ends)
    counts = np.diff(np.searchsorted(begins, text_ends), prepend=0)  # words per text
    gap = np.arange(len(texts)) * SHINGLE_WORDS  # the zeros after the texts before each
    words = np.zeros(len(hashes) + len(texts) * SHINGLE_WORDS, dtype=np.uint64)
    words[np.arange(len(hashes)) + np.repeat(gap, counts)] = hashes
    starts = np.cumsum(counts) - counts + gap  # each text's first word in ``words``
    per_text = np.maximum(1, counts - SHINGLE_WORDS + 1)
    firsts = np.cumsum(per_text) - per_text
    shingles = np.repeat(starts - firsts, per_text) + np.arange(int(per_text.sum()))
    return words, shingles, firsts


_ASCII_BLANK = np.zeros(256, dtype=bool)
_ASCII_BLANK[list(b" \t\n\r\x0b\x0c")] = True
# zlib's CRC-32 (reflected, polynomial 0xEDB88320), one byte at a time
_CRC_TABLE = np.array([functools.reduce(lambda c, _: (c >> 1) ^ (0xEDB88320 if c & 1 else 0), range(8), n)
                       for n in range(256)], dtype=np.uint32)
_VECTOR_CRC_BYTES = 32  # longer words (a URL, a hash) are few: zlib takes them one by one


def _crc32s(data: np.ndarray, begins: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``zlib.crc32`` of each ``data[begins[i]:ends[i]]``: byte k of every word at once, longest words first."""
    lengths = ends - begins
    order = np.argsort(-lengths, kind="stable")
    crc = np.full(len(order), 0xFFFFFFFF, dtype=np.uint32)
    first = int(np.count_nonzero(lengths > _VECTOR_CRC_BYTES))  # the long words come first in ``order``
    short = order[first:]
    starts, shorter = begins[short], -lengths[short]  # ascending: for searchsorted
    for k in range(int(-shorter[0]) if len(shorter) else 0):
        m = int(np.searchsorted(shorter, -k))  # the words longer than k bytes: a prefix
        part = crc[first:first + m]
        crc[first:first + m] = _CRC_TABLE[(part ^ data[starts[:m] + k]) & 0xFF] ^ (part >> np.uint32(8))
    crc ^= np.uint32(0xFFFFFFFF)
    raw = data.tobytes() if first else b""
    for i, word in enumerate(order[:first]):
        crc[i] = zlib.crc32(raw[begins[word]:ends[word]])
    out = np.empty(len(order), dtype=np.uint64)
    out[order] = crc
    return out


def minhash_signature(text: str) -> np.ndarray:
    """`minhash_signatures` of one text."""
    return minhash_signatures([text])[0]


@functools.lru_cache(maxsize=8)
def band_layout(threshold: float) -> tuple[tuple[int, int], ...]:
    """[start, end) of each band of a signature, for `FuzzyIndex` at ``threshold`` (see there why lower)."""
    bands, rows = _STORED_LAYOUTS.get(threshold) or _optimal_layout(max(0.5, threshold - 0.15))
    return tuple((i * rows, (i + 1) * rows) for i in range(bands))


def _optimal_layout(threshold: float) -> tuple[int, int]:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=MINHASH_PERMUTATIONS)
    return lsh.b, lsh.r


# Odd 64-bit multipliers, one per signature position, that mix a band's values into one key.
_BAND_MIX = np.random.RandomState(2).randint(0, 1 << 62, MINHASH_PERMUTATIONS, dtype=np.uint64) * np.uint64(2) + 1


def band_keys_of(signatures: np.ndarray, threshold: float) -> list[tuple[int, ...]]:
    """One 64-bit key per band of each row of ``signatures``: equal bands give equal keys. Deterministic, unlike
    Python's `hash` (which differs per process): worker processes compute these and the process that deduplicates
    looks them up. Two different bands may share a key; `FuzzyIndex` checks every candidate's similarity, so that
    costs a comparison, never a record."""
    mixed = signatures.astype(np.uint64) * _BAND_MIX  # wraps: mod 2⁶⁴
    columns = [_fmix64(mixed[:, start:end].sum(axis=1, dtype=np.uint64) + np.uint64(end - start))
               for start, end in band_layout(threshold)]
    return list(zip(*(c.tolist() for c in columns))) if columns else [() for _ in signatures]


def band_keys(signature: np.ndarray, threshold: float) -> tuple[int, ...]:
    """`band_keys_of` one signature."""
    return band_keys_of(signature[None, :], threshold)[0]


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


class FuzzyIndex:
    """Kept records' MinHash signatures, banded for locality-sensitive lookup: is a new record a fuzzy copy?

    The bands (datasketch's optimal layout) are tuned for a lower similarity than the threshold, so few true
    copies are missed (a pair exactly at 0.85 is found 92% of the time, at 0.9 99%; bands tuned for 0.85
    itself find half); each candidate is then checked with the estimated Jaccard similarity, so a false
    candidate costs time, never a record. The buckets hold one int per band and record and the signatures
    sit in numpy blocks: ~1 KB per kept record, where `datasketch.MinHashLSH`'s sets took ~4 KB (measured on
    100k records), which decides how large a set fits in memory.
    """

    BLOCK = 4096

    def __init__(self, threshold: float):
        self.buckets: list[dict[int, int | list[int]]] = [{} for _ in band_layout(threshold)]  # band key → key(s)
        self.threshold = threshold
        self.blocks: list[np.ndarray] = []
        self.count = 0

    def signature(self, key: int) -> np.ndarray:
        return self.blocks[key // self.BLOCK][key % self.BLOCK]

    def matches(self, signature: np.ndarray, bands: tuple[int, ...] | None = None) -> list[int]:
        """Keys of the kept records at least ``threshold`` similar to ``signature`` (estimated Jaccard); ``bands``:
        its `band_keys`, where already computed."""
        return self._similar(signature, self._hits(signature, bands))

    def add(self, signature: np.ndarray, bands: tuple[int, ...] | None = None) -> int:
        """Index a kept record's signature (``bands``: its `band_keys`, where already computed); returns its key
        (0, 1, 2, … in the order added)."""
        bands = bands or band_keys(signature, self.threshold)
        return self._insert(signature, bands, self._hits(signature, bands))

    def add_unless_similar(self, signature: np.ndarray, bands: tuple[int, ...]) -> bool:
        """`add` unless `matches` finds a similar kept record (then False), looking up each band once for both:
        deduplication asks this of every record."""
        hits = self._hits(signature, bands)
        if hits.count(None) < len(hits) and self._similar(signature, hits):
            return False
        self._insert(signature, bands, hits)
        return True

    def _hits(self, signature: np.ndarray, bands: tuple[int, ...] | None) -> list[int | list[int] | None]:
        """What each band's bucket holds for ``signature``'s band keys."""
        return list(map(dict.get, self.buckets, bands or band_keys(signature, self.threshold)))

    def _similar(self, signature: np.ndarray, hits: list) -> list[int]:
        candidates = {k for hit in hits if hit is not None for k in (hit if isinstance(hit, list) else (hit,))}
        return sorted(k for k in candidates if float(np.mean(self.signature(k) == signature)) >= self.threshold)

    def _insert(self, signature: np.ndarray, bands: tuple[int, ...], hits: list) -> int:
        key = self.count
        if key % self.BLOCK == 0:
            self.blocks.append(np.empty((self.BLOCK, MINHASH_PERMUTATIONS), dtype=signature.dtype))
        self.blocks[-1][key % self.BLOCK] = signature
        for band, buckets, found in zip(bands, self.buckets, hits):
            if found is None:
                buckets[band] = key
            elif isinstance(found, list):
                found.append(key)
            else:
                buckets[band] = [found, key]
        self.count += 1
        return key
