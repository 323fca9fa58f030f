"""Unicode normalisation of input: NFKC, then invisible and control characters removed.

Attacks hide instructions from people and filters with characters that render as nothing
(zero-width spaces and joiners, the tag block U+E0000..U+E007F that can spell ASCII
invisibly, bidi overrides that reorder what a reader sees) or with look-alike forms that NFKC
folds (full-width letters, ligatures, mathematical alphabets). Newlines and tabs stay: they
carry the structure of ordinary text.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass

KEEP = frozenset("\n\t")
# Format characters (Cf) include every zero-width and bidi control; Cc the C0/C1 controls;
# Co private use and Cn unassigned code points render as nothing reliable.
STRIP_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cn"})
# Invisible characters outside those categories.
EXTRA_INVISIBLE = frozenset({"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"})


@dataclass(frozen=True)
class Normalized:
    text: str
    changed: bool  # NFKC changed the text (before stripping)
    stripped: dict[str, int]  # "U+200B ZERO WIDTH SPACE" -> how many were removed


def _label(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, unicodedata.category(ch))}"


def normalize_text(text: str) -> Normalized:
    """``text`` in NFKC with invisible / control characters removed (``\\n`` and ``\\t`` kept;
    ``\\r\\n`` becomes ``\\n``), and what was removed."""
    folded = unicodedata.normalize("NFKC", text)
    folded = folded.replace("\r\n", "\n")
    kept, removed = [], Counter()
    for ch in folded:
        if ch in KEEP or not (unicodedata.category(ch) in STRIP_CATEGORIES or ch in EXTRA_INVISIBLE):
            kept.append(ch)
        else:
            removed[_label(ch)] += 1
    return Normalized("".join(kept), folded != text, dict(removed))
