"""PII detection and redaction with Presidio's pattern recognizers.

Presidio runs with its no-op NLP engine: no spaCy model is loaded or downloaded, so only the
recognizers that work from patterns and checksums answer (e-mail, phone, credit card, IBAN,
SSN, IP address, ...). Names and street addresses need a named-entity model and are not
detected here. Findings carry positions and entity types, never the matched text, so they can
be logged and stored.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The entities genops looks for by default: the pattern recognizers that fire on contact and
# payment data with few false positives on ordinary prose.
DEFAULT_ENTITIES: tuple[str, ...] = (
    "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS",
)
DEFAULT_MIN_SCORE = 0.4
# Fewest digits of a phone finding: a shorter one is a count or an id that some numbering plan
# happens to allow (phonenumbers validates "16868" as a German pager number), not a reachable
# contact. Subscriber numbers with their area code have at least 7 digits.
MIN_PHONE_DIGITS = 7

_lock = threading.Lock()


@dataclass(frozen=True)
class PiiFinding:
    entity: str
    start: int
    end: int
    score: float

    def describe(self) -> str:
        return f"{self.entity}@{self.start}:{self.end}"


@functools.cache
def _analyzer():
    """One Presidio analyzer per process (building it compiles every recognizer's patterns)."""
    import tldextract.tldextract as tx

    # Presidio's e-mail and URL recognizers ask tldextract for domain suffixes; its default
    # extractor fetches the public suffix list over the network before falling back to the
    # snapshot inside the wheel. Use the snapshot only: nothing is downloaded at run time.
    tx.TLD_EXTRACTOR = tx.TLDExtract(suffix_list_urls=(), cache_dir=None)
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine

    engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(languages=["en"], nlp_engine=engine)
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


def known_entities() -> set[str]:
    return set(_analyzer().get_supported_entities(language="en"))


def check_entities(entities: Iterable[str]) -> tuple[str, ...]:
    """``entities`` as given, or a clear error naming those Presidio cannot recognise here."""
    entities = tuple(entities)
    unknown = sorted(set(entities) - known_entities())
    if unknown:
        raise ValueError(f"unknown PII entities {unknown}; known: {sorted(known_entities())}")
    return entities


def find_pii(text: str, entities: Sequence[str] = DEFAULT_ENTITIES,
             min_score: float = DEFAULT_MIN_SCORE) -> list[PiiFinding]:
    """PII spans in ``text`` scoring at least ``min_score``, overlapping spans merged into the
    highest-scoring one, in text order; phone numbers of fewer than ``MIN_PHONE_DIGITS`` digits
    are not findings."""
    if not text:
        return []
    analyzer = _analyzer()
    with _lock:  # recognizers keep per-call state; one analysis at a time
        results = analyzer.analyze(text=text, language="en", entities=list(entities))
    found = sorted((PiiFinding(r.entity_type, r.start, r.end, float(r.score)) for r in results
                    if r.score >= min_score and not _short_phone(r.entity_type, text[r.start:r.end])),
                   key=lambda f: (-f.score, f.start))
    kept: list[PiiFinding] = []
    for f in found:
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def _short_phone(entity: str, span: str) -> bool:
    return entity == "PHONE_NUMBER" and sum(c.isdigit() for c in span) < MIN_PHONE_DIGITS


def redact_pii(text: str, entities: Sequence[str] = DEFAULT_ENTITIES,
               min_score: float = DEFAULT_MIN_SCORE) -> tuple[str, list[PiiFinding]]:
    """``text`` with every PII span replaced by ``<ENTITY>``, and the findings (positions in
    the original text)."""
    findings = find_pii(text, entities, min_score)
    out, last = [], 0
    for f in findings:
        out.append(text[last:f.start])
        out.append(f"<{f.entity}>")
        last = f.end
    out.append(text[last:])
    return "".join(out), findings
