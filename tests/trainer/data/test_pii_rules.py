"""The rule-based PII passes without a model: names where the text says a name follows, IBANs whose check
digits fail (masked when country and length fit, counted apart), street addresses; the patterns' fast forms."""
from __future__ import annotations

import random
import re

import pytest

from tunerun.trainer.data import clean
from tunerun.trainer.data.clean import mask_pii
from tunerun.trainer.data.names import mask_names


@pytest.mark.parametrize("text, masked", [
    ("Dear Ms Novak, my printer is broken.", "Dear Ms <PERSON>, my printer is broken."),
    ("Kind regards, José", "Kind regards, <PERSON>"),
    ("Best, Anna Rossi", "Best, <PERSON>"),
    ("Thanks!\nSam", "Thanks!\n<PERSON>"),
    ("KIND REGARDS, JOSÉ!!", "KIND REGARDS, <PERSON>!!"),
    ("my name is Piotr Kowalski and I need help", "my name is <PERSON> and I need help"),
    ("Hello Mr. Smith, the invoice", "Hello Mr. <PERSON>, the invoice"),
    ("Mit freundlichen Grüßen\nJonas Becker", "Mit freundlichen Grüßen\n<PERSON>"),
    ("Cordiali saluti, Giulia Bianchi", "Cordiali saluti, <PERSON>"),
    ("--\nMaria Lopez\nACME Ltd", "--\n<PERSON>\nACME Ltd"),
])
def test_names_after_greetings_sign_offs_and_introductions_are_masked(text, masked):
    counts = {}
    assert mask_names(text, counts) == masked and counts == {"person": 1}


@pytest.mark.parametrize("text", ["Hi there, my order is late", "Dear Customer,", "Thanks. Printer broken again",
                                  "Best Practices are in the manual", "Thanks for the help", "Hi Anna how are you"])
def test_cues_followed_by_no_name_or_by_prose_are_left_alone(text):
    counts = {}
    assert mask_names(text, counts) == text and counts == {}


def test_ibans_with_failed_check_digits_are_masked_when_country_and_length_fit():
    counts = {}
    text = ("ok DE89 3704 0044 0532 0130 00, typo DE89370400440532013001, IT61X0542811101000000123456 too; "
            "short DE8937040044 and unknown XX12345678901234567 stay")
    assert mask_pii(text, counts) == ("ok <IBAN>, typo <IBAN>, <IBAN> too; short DE8937040044 and unknown "
                                      "XX12345678901234567 stay")
    assert counts == {"iban": 1, "iban_checksum_failed": 2}


def test_street_addresses_and_the_kinds_a_spec_leaves_out():
    counts = {}
    text = "Send it to 221B Baker Street or Hauptstraße 5, or Via Roma 12; mail a@b.example.com"
    assert mask_pii(text, counts) == ("Send it to <STREET_ADDRESS> or <STREET_ADDRESS>, or <STREET_ADDRESS>; "
                                      "mail <EMAIL>")
    assert counts == {"street_address": 3, "email": 1}
    assert mask_pii(text, {}, frozenset({"email"})).startswith("Send it to 221B Baker Street")


# The rule patterns as first written, with a leading word boundary or lookbehind; `clean` begins each with a
# character class instead (faster to search) and must find exactly what these find.
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_CAP = r"[A-ZÀ-ÖØ-Þ][a-zà-öø-ÿA-Z'-]+"
PLAIN_PATTERNS = {
    "IBAN": r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
    "CARD": r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])",
    "IPV4": rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)",
    "PHONE": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w]|[.-]\d)",
    "STREET_ADDRESS": (
        rf"\b\d{{1,5}}[A-Za-z]?,? (?:{_CAP} ){{1,3}}(?:{clean._STREET_WORDS})(?![\w])"
        rf"|\b{_CAP}(?:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer) \d{{1,5}}[a-z]?\b"
        rf"|\b(?:Via|Viale|Piazza|Corso|Largo|Vicolo|Rue|Avenue|Boulevard|Calle|Avenida|Rua) (?:(?:de|del|della|di|"
        rf"dei|des|du|la|le|da|do|dos) )?(?:{_CAP} ){{0,2}}{_CAP},? \d{{1,5}}[a-zA-Z]?\b"),
}
PIECES = ["+", "+44", "(", "(555)", ")", "-", ".", " ", " ", ",", "_", "x", "é", "\n", "'", "0", "1", "2", "5", "12", "25",
          "199", "255", "256", "4111", "555", "12345", "4111 1111 1111 1111", "192.168.0.1", "10.0.0.1", "99.12.5.255",
          "8.8.8.8", "25.250.251.249", "255.255.255.0", "250.1.1.1", "256.1.1.1", "01.2.3.4", "300.1.2.3", "1.2.3.4.5",
          "DE89", "3704 0044 0532", "GB", "Baker", "Main", "Élysée", "Street", "St.", "Way", "Hauptstraße", "Gartenweg",
          "Via", "Viale", "Rue", "Rua", "Calle", "Corso", "della", "de", "Roma", "Rivoli", "221B", "٣"]


def test_the_rule_patterns_find_what_their_plain_forms_find():
    rng, found = random.Random(0), dict.fromkeys(PLAIN_PATTERNS, 0)
    texts = ["".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))
             for _ in range(30_000)]
    for name, plain in PLAIN_PATTERNS.items():
        plain, fast = re.compile(plain), getattr(clean, name)
        for text in texts:
            spans = [m.span() for m in plain.finditer(text)]
            assert [m.span() for m in fast.finditer(text)] == spans, (name, text)
            found[name] += bool(spans)
    assert min(found.values()) > 20, found  # every pattern met texts it matches
