"""Train a tiny spaCy NER pipeline (PERSON, GPE) offline in seconds and install it as a spaCy package by name.

    python examples/make_tiny_ner.py /tmp/tiny-ner      # prints the folder to put on PYTHONPATH
    PYTHONPATH=/tmp/tiny-ner/site tunerun data prepare job.yaml --set 'data.clean.ner={model: en_tunerun_tiny_ner}'

Tests and the data-preparation benchmark use it in place of ``en_core_web_lg`` (official spaCy pipelines are not
on PyPI, and nothing may be downloaded here). It goes the same way a real pipeline does: ``spacy package`` makes
the installable package, pip installs it (``--target``, offline, no build isolation) into ``<out>/site``, and
``spacy.load("en_tunerun_tiny_ner")`` finds it by name through its distribution metadata. A folder on
``PYTHONPATH`` rather than the virtualenv: the environment variable reaches every process that prepares data —
the CLI, the run's driver and the Ray workers it starts — and the test leaves the shared virtualenv as it was.

The training sentences are support-ticket phrases with names and cities drawn from `NAMES` and `CITIES` (and as
many sentences without any), so the pipeline knows these values in these contexts; it is a stand-in that
exercises the real Presidio → spaCy path, not a general-purpose model.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

PACKAGE = "en_tunerun_tiny_ner"
NAMES = ["Anna Rossi", "Marek Novak", "Jonas Becker", "Giulia Bianchi", "Priya Sharma", "Lukas Weber",
         "Sofia Conti", "Tomasz Kowalski", "Elena Marino", "David Fischer", "Chiara Ricci", "Oliver Brandt"]
CITIES = ["Munich", "Bologna", "Rotterdam", "Krakow", "Lyon", "Valencia", "Graz", "Turin", "Leipzig", "Porto",
          "Brno", "Gdansk"]
WITH_PERSON = ["My colleague {person} ordered the laptop last week.", "Please send the invoice to {person}.",
               "{person} called about the refund yesterday.", "The ticket was opened by {person} on Monday.",
               "I spoke with {person} from your billing team.", "Can {person} reset the password for me?"]
WITH_CITY = ["The parcel is stuck in {city} since Friday.", "We moved our office to {city} in March.",
             "The courier left it at the depot in {city}.", "Our warehouse in {city} has no stock.",
             "I travel to {city} next week and need the charger.", "Delivery to {city} failed twice."]
WITH_BOTH = ["{person} lives in {city} and never got the package.", "Ship it to {person} in {city}, please.",
             "{person} from {city} reported the same crash."]
WITHOUT = ["The printer shows an error after the update.", "My subscription renewed twice this month.",
           "The app crashes when I open the settings.", "Please cancel my order, it is too late now.",
           "The battery drains overnight even when switched off.", "I was billed for a plan I never chose.",
           "Thanks for the quick answer, it works again.", "Where can I download the latest invoice?",
           "Mail me at <EMAIL> or call <PHONE>.", "The refund should go to IBAN <IBAN> as before.",
           "Order 4471 arrived on Monday, but the box was empty.", "In March the Premium plan cost more."]
# Around the sentences, as in a ticket: greetings and sign-offs (by then the rule-based pass has often
# replaced the name with <PERSON>, so the pipeline sees that placeholder too).
OPENINGS = ["", "", "Hello,", "Hi there,", "Dear support team,", "Good morning,", "Hello team!"]
CLOSINGS = ["", "", "Thanks!", "Kind regards", "Best regards, <PERSON>", "Cheers", "Kind regards, {person}",
            "Best, {person}", "Thank you, {person}"]


def ticket(rng: random.Random) -> tuple[str, list[tuple[int, int, str]]]:
    """A ticket number, an opening, one or two sentences and a closing (each but the sentences optional), with
    the spans of the names and cities in it."""
    text, spans = "", []
    number = f"Ticket {rng.randint(1000, 9999)}:" if rng.random() < 0.5 else ""
    opening = rng.choice(OPENINGS)
    sentences = [rng.choice(rng.choice([WITH_PERSON, WITH_CITY, WITH_BOTH, WITHOUT])) for _ in range(rng.randint(1, 2))]
    parts = [number, opening, *sentences, rng.choice(CLOSINGS)]
    for part in filter(None, parts):
        piece, found = fill(part, rng)
        offset = len(text) + (1 if text else 0)
        text = f"{text} {piece}" if text else piece
        spans += [(a + offset, b + offset, label) for a, b, label in found]
    return text, spans


def fill(template: str, rng: random.Random) -> tuple[str, list[tuple[int, int, str]]]:
    """``template`` with {person} and {city} drawn from `NAMES` and `CITIES`, and the spans they took."""
    person, city = rng.choice(NAMES), rng.choice(CITIES)
    text, spans = "", []
    for i, part in enumerate(template.replace("{city}", "\x00city\x00").replace("{person}", "\x00person\x00")
                             .split("\x00")):
        if i % 2 == 0:
            text += part
            continue
        value, label = (person, "PERSON") if part == "person" else (city, "GPE")
        spans.append((len(text), len(text) + len(value), label))
        text += value
    return text, spans


def train_pipeline(out: Path, tickets: int = 500, epochs: int = 10, seed: int = 0) -> Path:
    """Train the pipeline and save it to ``out``; returns ``out``."""
    import spacy
    from spacy.training import Example

    spacy.util.fix_random_seed(seed)
    rng = random.Random(seed)
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("ner")
    for label in ("PERSON", "GPE"):
        ner.add_label(label)
    examples = [Example.from_dict(nlp.make_doc(text), {"entities": spans})
                for text, spans in (ticket(rng) for _ in range(tickets))]
    optimizer = nlp.initialize(lambda: examples)
    for _ in range(epochs):
        rng.shuffle(examples)
        for batch in spacy.util.minibatch(examples, size=16):
            nlp.update(batch, sgd=optimizer, drop=0.1)
    nlp.meta.update({"name": PACKAGE.removeprefix("en_"), "version": "0.0.1",
                     "description": "tiny test NER pipeline (PERSON, GPE), tunerun examples/make_tiny_ner.py"})
    nlp.to_disk(out)
    return out


def make_tiny_ner(root: Path) -> Path:
    """Train, package and install the pipeline under ``root``; returns the folder to put on ``PYTHONPATH``."""
    root = Path(root)
    site = root / "site"
    if (site / PACKAGE).is_dir():
        return site
    root.mkdir(parents=True, exist_ok=True)
    pipeline = train_pipeline(root / "pipeline")
    (root / "package").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "spacy", "package", str(pipeline), str(root / "package"), "--build", "none",
                    "--force"], check=True, capture_output=True)
    source = root / "package" / f"{PACKAGE}-0.0.1"
    # Offline: no index, no build isolation (that would fetch setuptools), no dependencies (spaCy is there).
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)], check=True)
    return site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    print(make_tiny_ner(parser.parse_args().root))


if __name__ == "__main__":
    main()
