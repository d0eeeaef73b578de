"""Is the named-entity setup a spec asks for (``data.clean.ner``) installed here? Answered without importing
Presidio or spaCy, so `tunerun validate` stays fast, and before Presidio is built: Presidio's spaCy engine
*downloads* a pipeline it cannot find, which on an offline cluster hangs and on any other machine fetches
code nobody reviewed. tunerun refuses instead and says how to install it.
"""
from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from tunerun.jobs.spec import NerSpec

NER_EXTRA_HINT = "pip install 'tunerun[ner]' (presidio-analyzer, presidio-anonymizer, spacy)"


def spacy_package_installed(name: str) -> bool:
    """What ``spacy.load(name)`` accepts without a download: an installed distribution of that name (spaCy asks
    `importlib.metadata`, which also finds one in a folder on ``PYTHONPATH``) or a pipeline folder."""
    try:
        distribution(name)
        return True
    except PackageNotFoundError:
        return Path(name).expanduser().is_dir() and (Path(name).expanduser() / "config.cfg").is_file()


def missing_ner_setup(ner: NerSpec) -> str | None:
    """Why this Python cannot run ``ner``, with what to install; None when it can."""
    missing = [m for m in ("presidio_analyzer", "presidio_anonymizer", "spacy") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"needs {', '.join(missing)}, not installed in {sys.executable}: {NER_EXTRA_HINT}; "
                "or set data.clean.ner: null to mask with tunerun's rule-based detectors only")
    absent = sorted({name for name in ner.models().values() if not spacy_package_installed(name)})
    if not absent:
        return None
    name = absent[0]
    return (f"spaCy pipeline {', '.join(absent)} is not installed in {sys.executable} (tunerun never downloads "
            f"one). Install it on every machine that prepares data: on a machine with internet, "
            f"`python -m spacy download {name}` (or download its wheel from "
            f"https://github.com/explosion/spacy-models/releases) and `pip install {name}-<version>-py3-none-any.whl` "
            "where the data is prepared; a pipeline folder (spacy's nlp.to_disk) may be named by path instead; or "
            "set data.clean.ner: null to mask with the rule-based detectors only")
