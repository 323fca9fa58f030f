"""Output checks that need no model: system-prompt leaks (canary) and markup that could
exfiltrate data.

Canary: a leak is the configured canary token (when the server adds one to the system prompt)
or any run of ``min_span_words`` consecutive words of the system prompt appearing verbatim in
the answer (case, punctuation and spacing ignored).

Markup: a markdown image to an absolute URL is fetched by the client that renders the answer,
so an injected instruction can make the model put the conversation into that URL's query and
send it away without a click; a link does the same with one click. Both lose their URL here.
HTML tags in an answer are escaped (``<img src=...>`` would do the same). An answer without markup,
such as a task's JSON object, passes unchanged: nothing is escaped that is not markup.
"""

from __future__ import annotations

import re
import secrets

_WORD = re.compile(r"\w+")
# What opens a tag, end tag, comment or declaration for an HTML parser ("< b" does not).
_HTML = re.compile(r"<[A-Za-z/!?]")
# An absolute URL: a scheme (http:, data:, javascript:, ...) or a protocol-relative //host.
_ABSOLUTE = r"(?:[A-Za-z][A-Za-z0-9+.\-]*:|//)"
_TITLE = r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?"
_MD_LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(\s*<?(" + _ABSOLUTE + r"[^)\s>]*)>?" + _TITLE + r"\s*\)")
_MD_REFERENCE = re.compile(r"^( {0,3}\[[^\]\n]+\]:)[ \t]*<?" + _ABSOLUTE + r"\S*", re.MULTILINE)
LINK_REMOVED = "[link removed]"


def new_canary() -> str:
    return f"GENOPS-CANARY-{secrets.token_hex(8)}"


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


class PromptLeakDetector:
    """Finds ``min_span_words``-word runs of a system prompt inside an answer."""

    def __init__(self, min_span_words: int):
        self.n = min_span_words
        self._cache: dict[str, frozenset[tuple[str, ...]]] = {}

    def _spans(self, prompt: str) -> frozenset[tuple[str, ...]]:
        spans = self._cache.get(prompt)
        if spans is None:
            words = _words(prompt)
            spans = frozenset(tuple(words[i:i + self.n]) for i in range(len(words) - self.n + 1))
            if len(self._cache) > 256:  # a few prompts per task; requests with their own are bounded here
                self._cache.clear()
            self._cache[prompt] = spans
        return spans

    def leaked_words(self, answer: str, prompt: str) -> int:
        """How many words of ``answer`` lie in a leaked run (0: no leak)."""
        spans = self._spans(prompt)
        if not spans:
            return 0
        words = _words(answer)
        covered = set()
        for i in range(len(words) - self.n + 1):
            if tuple(words[i:i + self.n]) in spans:
                covered.update(range(i, i + self.n))
        return len(covered)


def escape_markup(text: str) -> tuple[str, list[str]]:
    """``text`` with markdown images/links to absolute URLs neutralised and HTML escaped, and
    what was done (``"image"``, ``"link"``, ``"reference"``, ``"html"``); ``text`` unchanged
    when it holds no such markup."""
    done: list[str] = []

    def link(m: re.Match) -> str:
        is_image, label = bool(m.group(1)), m.group(2).strip()
        done.append("image" if is_image else "link")
        if is_image:
            return f"[image: {label}]" if label else "[image removed]"
        return f"{label} {LINK_REMOVED}" if label else LINK_REMOVED

    out = _MD_LINK.sub(link, text)

    def reference(m: re.Match) -> str:
        done.append("reference")
        return f"{m.group(1)} {LINK_REMOVED}"

    out = _MD_REFERENCE.sub(reference, out)

    def tag(m: re.Match) -> str:
        done.append("html")
        return "&lt;" + m.group(0)[1:]

    # Only the "<" that opens a tag is escaped: the tag becomes text, and the rest of the
    # answer (an "&" or "3 < 5" in prose) stays as written.
    return _HTML.sub(tag, out), done
