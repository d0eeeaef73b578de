"""Generate examples/data/support_tickets.jsonl: a small, learnable ticket-classification task.

    python examples/make_support_data.py            # rewrites examples/data/support_tickets.jsonl
    python examples/make_support_data.py OUT.jsonl --records 600 --seed 0

Each line is one record in OpenAI chat format::

    {"messages": [{"role": "system", "content": "Classify the support ticket."},
                  {"role": "user", "content": "<ticket text>"},
                  {"role": "assistant", "content": "category: <label>"}]}

Every category has its own keyword-bearing sentences, mixed with fillers shared by all categories, so a
tiny model can learn the label from the keywords. The file also carries what the data pipeline must cope
with (the tests rely on these exact numbers, so change them together):

- `EXACT_DUPLICATES` records appear twice, byte for byte;
- `NEAR_DUPLICATES` records appear a second time changed only in case and punctuation;
- some tickets carry fake contact details (emails, phone numbers, an IP address, an IBAN) for PII masking.

Apart from those copies every ticket is unique, even after PII is masked: uniqueness is checked on the
ticket body *before* the contact sentence is appended. The output is byte-identical for the same seed.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "support_tickets.jsonl"
SYSTEM_PROMPT = "Classify the support ticket."
EXACT_DUPLICATES = 5
NEAR_DUPLICATES = 3

PRODUCTS = ["the Pro plan", "my Basic subscription", "the mobile app", "the desktop client", "the smart speaker",
            "the wireless headphones", "the coffee grinder", "the standing desk", "the team workspace",
            "the photo printer", "the e-reader", "the fitness tracker"]
WHEN = ["yesterday", "this morning", "last week", "two days ago", "on Monday", "since Friday",
        "after the last update", "earlier today", "three weeks ago", "over the weekend"]

# {p} product, {w} when, {o} order number, {a} amount. Keywords are what a model should pick up.
CATEGORIES: dict[str, dict[str, list[str]]] = {
    "billing": {
        "main": ["I was charged twice for {p} {w}.", "My invoice for {p} shows the wrong amount of {a}.",
                 "Why did my credit card get billed {a} for {p}?", "The monthly charge for {p} went up to {a}.",
                 "I need a copy of the invoice for order {o}.",
                 "There is an unexpected charge of {a} on my statement.",
                 "Please update the billing address on my invoice.",
                 "My payment method was declined {w} but I was still billed."],
        "detail": ["The billing page lists two charges.", "My bank statement shows the charge clearly.",
                   "I only expected one invoice this month.", "The tax on the invoice also looks wrong."],
    },
    "login": {
        "main": ["I can't log in to {p} {w}.", "My password reset link for {p} does not work.",
                 "The login page keeps saying my password is incorrect.",
                 "I am locked out of my account since {w}.",
                 "Two-factor authentication codes are rejected when I sign in.",
                 "I never receive the password reset email.", "Sign in fails with an error about my username.",
                 "After changing my password I cannot log in anymore."],
        "detail": ["I tried resetting the password three times.",
                   "The login works on my phone but not on my laptop.", "My username is correct, I checked.",
                   "The sign in button just spins."],
    },
    "shipping": {
        "main": ["My package for order {o} has not arrived yet.",
                 "The tracking number for {p} shows no movement since {w}.",
                 "The courier delivered my parcel to the wrong address.", "When will order {o} be shipped?",
                 "The delivery of {p} is late by a week.", "Can I change the shipping address for order {o}?",
                 "The parcel was marked delivered {w} but I never got it.",
                 "Shipping to my country seems to be stuck in customs."],
        "detail": ["The tracking page has not updated.", "I was home all day and no courier came.",
                   "The estimated delivery date has passed.", "My neighbour did not receive the package either."],
    },
    "refund": {
        "main": ["I would like a refund for {p}.", "I returned {p} {w} and I am still waiting for my money back.",
                 "Please refund order {o}, the item arrived broken.", "How long does a refund of {a} take?",
                 "I cancelled {p} within the trial and want my money back.",
                 "My refund request for order {o} was rejected.",
                 "I sent the item back and need the refund processed.",
                 "Can I get my money back for an unused {p}?"],
        "detail": ["The return label was used and the item is back with you.",
                   "I read the refund policy and I qualify.",
                   "Please send the money back to my original payment method.",
                   "The return was accepted by the warehouse."],
    },
    "bug": {
        "main": ["{p} crashes every time I open the settings.",
                 "There is a bug: the export button in {p} does nothing.",
                 "The screen freezes when I upload a file to {p}.", "I get an error 500 when saving a draft {w}.",
                 "Since {w} the app shows a blank page on startup.",
                 "Notifications in {p} appear twice, looks like a bug.",
                 "The search feature returns an error for every query.",
                 "{p} crashes with a stack trace after the update."],
        "detail": ["I can reproduce the crash every time.", "Reinstalling did not fix the error.",
                   "The bug also happens in safe mode.", "I attached a screenshot of the error message."],
    },
    "account": {
        "main": ["Please delete my account and all my data.", "How do I change the email address on my account?",
                 "I want to merge two accounts into one.", "Can I transfer my account to a colleague?",
                 "Please update the name on my account profile.", "I would like to close my account {w}.",
                 "How do I add a second user to my account settings?",
                 "I need to export all data from my account."],
        "detail": ["The account settings page does not offer this option.", "I am the owner of the account.",
                   "My profile still shows my old name.", "I want the account change done before the next cycle."],
    },
}
GREETINGS = ["", "", "Hi,", "Hello,", "Hello team,", "Good morning,", "Hi there,", "Dear support,"]
FILLERS = ["", "", "", "I have been a customer for years.", "This is quite urgent for me.",
           "Thanks for looking into it.", "I hope you can help.", "Please let me know what to do.",
           "My colleague had the same issue.", "I already checked the help center."]
SIGN_OFFS = ["", "", "", "Thanks!", "Best regards, Sam", "Cheers, Priya", "Kind regards, José",
             "Regards, Zoë", "Thank you, Tom"]
NAMES = ["jane.doe", "m.rossi", "li.wei", "olga.k", "tom.baker", "ana.silva"]
CONTACTS = [  # {e} email user, {n} digits; every kind of PII the masker knows appears at least once
    "You can reach me at {e}@example.com.", "Reply to {e}@mail.example.org please.",
    "Call me back on 555-{n}0-4477.", "My phone number is +1 (555) {n}1-2299.",
    "Email {e}@example.net or call +44 20 7946 0{n}8.",
]
RARE_CONTACTS = {  # (category, sentence): used once each so masking of these kinds is testable
    "bug": "The server at 192.168.14.{n} returns the error.",
    "refund": "Please send the refund to IBAN DE89 3704 0044 0532 0130 00.",
}


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        p=rng.choice(PRODUCTS), w=rng.choice(WHEN), o=f"#{rng.randint(10000, 99999)}",
        a=f"${rng.randint(5, 400)}.{rng.choice(['00', '49', '99'])}",
    )


def _ticket_body(label: str, rng: random.Random) -> str:
    parts = [rng.choice(GREETINGS), _fill(rng.choice(CATEGORIES[label]["main"]), rng)]
    if rng.random() < 0.6:
        parts.append(rng.choice(CATEGORIES[label]["detail"]))
    parts += [rng.choice(FILLERS), rng.choice(SIGN_OFFS)]
    return " ".join(p for p in parts if p)


def _contact(label: str, rng: random.Random, rare_left: dict[str, str]) -> str:
    n = f"{rng.randint(10, 99)}"
    if label in rare_left:
        return rare_left.pop(label).format(n=n)
    return rng.choice(CONTACTS).format(e=rng.choice(NAMES), n=n)


def _record(ticket: str, label: str) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": ticket},
        {"role": "assistant", "content": f"category: {label}"},
    ]}


def _near_key(text: str) -> str:
    # The same key the data pipeline's near-dedup uses: casefold, punctuation deleted, whitespace collapsed.
    return " ".join(re.sub(r"[^\w\s]", "", text.casefold()).split())


def _near_copy(record: dict) -> dict:
    """Same ticket, different case and punctuation: equal only after the stronger normalisation."""
    ticket = record["messages"][1]["content"]
    changed = re.sub(r"[,!?]|\.(?=\s|$)", "", ticket).upper() + "!!"
    return _record(changed, record["messages"][2]["content"].removeprefix("category: "))


def generate_records(n: int = 600, seed: int = 0) -> list[dict]:
    """`n` records: unique tickets plus `EXACT_DUPLICATES` exact and `NEAR_DUPLICATES` near copies."""
    rng = random.Random(seed)
    labels = sorted(CATEGORIES)
    unique_needed = n - EXACT_DUPLICATES - NEAR_DUPLICATES
    rare_left = dict(RARE_CONTACTS)
    seen: set[str] = set()
    records: list[tuple[dict, bool]] = []  # (record, carries contact details)
    while len(records) < unique_needed:
        label = labels[len(records) % len(labels)]
        body = _ticket_body(label, rng)
        if _near_key(body) in seen:
            continue
        seen.add(_near_key(body))
        with_contact = rng.random() < 0.08 or (label in rare_left and rng.random() < 0.3)
        if with_contact:
            body = f"{body} {_contact(label, rng, rare_left)}"
        records.append((_record(body, label), with_contact))
    rng.shuffle(records)
    # Near copies come from tickets without contact details: stripping the dots of an email would hide it
    # from the PII masker in the copy only, and the two would no longer match.
    plain = [i for i, (_, with_contact) in enumerate(records) if not with_contact]
    originals = rng.sample(plain, EXACT_DUPLICATES + NEAR_DUPLICATES)
    copies = [json.loads(json.dumps(records[i][0])) for i in originals[:EXACT_DUPLICATES]]
    copies += [_near_copy(records[i][0]) for i in originals[EXACT_DUPLICATES:]]
    out = [record for record, _ in records]
    for copy in copies:
        out.insert(rng.randint(0, len(out)), copy)
    return out


def make_support_data(out_path: Path = DEFAULT_OUT, n: int = 600, seed: int = 0) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in generate_records(n, seed)]
    out_path.write_text("".join(lines), encoding="utf-8", newline="\n")
    return out_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_support_data(args.out, args.records, args.seed))


if __name__ == "__main__":
    main()
