"""The rule-based PII passes without a model: names where the text says a name follows, IBANs whose check
digits fail (masked when country and length fit, counted apart), street addresses."""
from __future__ import annotations

import pytest

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
