"""A keyword stand-in for the shipped prompt-injection classifier, with its interface
(``load()``, ``score(text) -> (score, heuristics)``). Guardrail tests use it so that they test
the engine and the endpoint, not the classifier's weights (tested on their own).

The endpoint loads it with ``GENOPS_INJECTION_DETECTOR=injection_standin:StandInDetector.load``
and ``tests/`` on ``PYTHONPATH``; ``REAL_DETECTOR`` switches the guardrail tests to the shipped one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

REAL_DETECTOR = os.environ.get("GENOPS_TEST_REAL_INJECTION_DETECTOR") == "1"
SPEC = ("genops_assets.lib.guardrails.injection:InjectionDetector.load" if REAL_DETECTOR
        else "injection_standin:StandInDetector.load")

# Phrases of the usual attacks: override instructions, role-play jailbreaks, prompt extraction.
_SCORED = re.compile(r"ignore (?:all |any )?(?:the )?(?:previous|prior|above) (?:instructions|directions)"
                     r"|disregard (?:your|all|the) (?:rules|instructions)"
                     r"|\bDAN\b|do anything now|developer mode"
                     r"|(?:reveal|print|repeat|show) (?:me )?(?:your|the) (?:system )?(?:prompt|instructions)",
                     re.IGNORECASE)
_RULES = {"base64_payload": re.compile(r"\b[A-Za-z0-9+/]{24,}={0,2}(?:\s|$)")}


@dataclass(frozen=True)
class InjectionScore:
    score: float
    heuristics: tuple[str, ...]


class StandInDetector:
    @classmethod
    def load(cls, path=None) -> StandInDetector:
        return cls()

    def score(self, text: str) -> InjectionScore:
        rules = tuple(name for name, rx in _RULES.items() if rx.search(text))
        return InjectionScore(0.97 if _SCORED.search(text) else 0.03, rules)


def detector():
    """The detector the guardrail tests use."""
    if REAL_DETECTOR:
        from genops_assets.lib.guardrails.injection import InjectionDetector

        return InjectionDetector.load()
    return StandInDetector.load()
