"""The named-entity PII pass (``data.clean.ner``): Microsoft Presidio's analyzer over a spaCy pipeline the user
installed, and Presidio's anonymizer to put ``<PERSON>``, ``<LOCATION>``… in place of what it found.

It runs after the rule-based passes, on text in which emails, IBANs and the names of sign-offs are already
placeholders; a hit that overlaps a placeholder is dropped, so nothing is counted twice. Texts go through
spaCy in batches (``nlp.pipe`` via Presidio's `BatchAnalyzerEngine`), which is what makes NER affordable.

Only the NER recognizer is registered, not Presidio's predefined pattern recognizers: tunerun's own patterns
cover those entities, and Presidio's email recognizer calls tldextract, which fetches the public suffix list
over the network on first use (clusters are offline). There is no language detection: every text goes
through the pipeline of each distinct spaCy package in ``data.clean.ner``, so two packages cost twice.

One `EntityMasker` per process (`masker_for`): loading a large spaCy pipeline takes seconds and hundreds of
MB, and worker processes of the data pipeline each build their own.
"""
from __future__ import annotations

import copy
import functools
import re

from tunerun.jobs.errors import DataError
from tunerun.jobs.ner_setup import missing_ner_setup
from tunerun.jobs.spec import NerSpec

_PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")
BATCH_SIZE = 64


class EntityMasker:
    """Finds ``entities`` (Presidio names, e.g. PERSON, LOCATION) and replaces each with ``<ENTITY>``."""

    def __init__(self, ner: NerSpec, entities: tuple[str, ...]):
        from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
        from presidio_anonymizer import AnonymizerEngine

        if why := missing_ner_setup(ner):  # checked again here: Presidio would download a missing pipeline
            raise DataError(f"data.clean.ner: {why}")
        self.entities = list(entities)
        self.threshold = ner.score_threshold
        # One language per distinct package: the same pipeline for en, de and it runs once per text.
        by_package: dict[str, str] = {}
        for code, package in ner.models().items():
            by_package.setdefault(package, code)
        self.languages = list(by_package.values())
        engine = SpacyNlpEngine(models=[{"lang_code": code, "model_name": package}
                                        for package, code in by_package.items()])
        engine.load()
        registry = RecognizerRegistry(supported_languages=self.languages)
        registry.add_nlp_recognizer(nlp_engine=engine)
        analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=self.languages)
        self.batch = BatchAnalyzerEngine(analyzer_engine=analyzer)
        self.anonymizer = AnonymizerEngine()

    def mask(self, texts: list[str], counts: list[dict[str, int]]) -> list[str]:
        """``texts`` with their entities replaced; ``counts[i]`` gets text i's hits (``person``, ``location``…)."""
        # Each distinct text once: system prompts and stock phrases repeat on every record of a set.
        unique = list(dict.fromkeys(texts))
        hits: dict[str, list] = {text: [] for text in unique}
        for language in self.languages:
            found = self.batch.analyze_iterator(unique, language=language, entities=self.entities,
                                                score_threshold=self.threshold, batch_size=BATCH_SIZE)
            for text, results in zip(unique, found):
                hits[text] += results
        return [self._replace(text, hits[text], tally) for text, tally in zip(texts, counts)]

    def _replace(self, text: str, results: list, counts: dict[str, int]) -> str:
        taken = [m.span() for m in _PLACEHOLDER.finditer(text)]
        # Copies: the anonymizer may adjust the results it merges, and repeated texts share one list.
        results = [copy.copy(r) for r in results if not any(r.start < b and a < r.end for a, b in taken)]
        if not results:
            return text
        from presidio_anonymizer.entities import OperatorConfig

        # Presidio's "replace" default is "<ENTITY_TYPE>": the tokens tunerun's own passes write.
        done = self.anonymizer.anonymize(text=text, analyzer_results=results,
                                         operators={"DEFAULT": OperatorConfig("replace")})
        for item in done.items:  # after Presidio merged overlapping hits: one count per placeholder written
            kind = item.entity_type.lower()
            counts[kind] = counts.get(kind, 0) + 1
        return done.text


def masker_for(ner: NerSpec, entities: tuple[str, ...]) -> EntityMasker:
    return _cached_masker(ner.model_dump_json(), entities)


@functools.lru_cache(maxsize=2)  # keyed by the spec's JSON: NerSpec holds a list, so it is not hashable
def _cached_masker(ner_json: str, entities: tuple[str, ...]) -> EntityMasker:
    return EntityMasker(NerSpec.model_validate_json(ner_json), entities)
