"""Schema-constrained decoding: the answer is JSON that a JSON schema accepts, token by token.

llguidance compiles a schema into a grammar over the tokenizer's vocabulary; at each decoding
step a row's matcher yields the tokens that keep the answer inside the grammar (a bit mask),
the other logits become -inf, and the chosen token advances the matcher. The end-of-turn token
is allowed only once the JSON is complete, and a matcher that accepts nothing more ends its row.

Compilation is done once per (tokenizer, schema): the tokenizer wrapper (about a second to
build) is kept per tokenizer object, the checked grammar per schema digest. A schema that
llguidance refuses raises ``SchemaError`` naming where the schema came from (a file, a request
field).

The mask is applied with the bit layout of ``llguidance.torch`` (one bit per token, 32 to an
int32); it is unpacked with numpy rather than ``llguidance.torch.apply_token_bitmask_inplace``,
whose kernel goes through ``torch.compile`` (a 12-17 s compilation on first use on CPU, and
about 4x slower per step than this when forced eager).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from genops_assets.lib.hashing import sha256_json

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
"""The schema of OpenAI's ``response_format: {"type": "json_object"}``: any JSON object."""

# Whitespace between tokens is the model's choice (so a greedy answer that is already valid JSON
# passes through the mask unchanged) but bounded: a run of at most 8 characters, enough for
# indented JSON, never an endless stream of blanks (which an unsure model falls into once
# everything else is masked).
WHITESPACE = r"[\x20\x0A\x0D\x09]{0,8}"
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": WHITESPACE}


class SchemaError(ValueError):
    """A JSON schema that cannot constrain decoding; the message names where it came from."""


@dataclass(frozen=True)
class CompiledSchema:
    """A schema compiled for one tokenizer; ``matcher()`` starts a row."""

    grammar: str
    digest: str
    where: str
    llg_tokenizer: Any  # llguidance.LLTokenizer
    end_id: int

    def matcher(self) -> RowMatcher:
        return RowMatcher(self)


_LOCK = threading.Lock()
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> LLTokenizer
_GRAMMARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> {digest: CompiledSchema}


def schema_digest(schema: Mapping[str, Any]) -> str:
    return sha256_json(dict(schema))


def llg_tokenizer(tokenizer):
    """The llguidance view of a Hugging Face fast tokenizer (built once per tokenizer object)."""
    from llguidance.hf import from_tokenizer

    with _LOCK:
        cached = _TOKENIZERS.get(tokenizer)
        if cached is None:
            cached = from_tokenizer(tokenizer, eos_token=tokenizer.eos_token_id)
            _TOKENIZERS[tokenizer] = cached
        return cached


def check_schema(schema: Any, where: str = "json_schema", llg=None) -> None:
    """SchemaError naming ``where`` unless llguidance can decode within ``schema`` (without a
    tokenizer: a cheap check for request validation)."""
    from llguidance import LLMatcher

    if not isinstance(schema, Mapping):
        raise SchemaError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    try:
        grammar = LLMatcher.grammar_from_json_schema(dict(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"{where}: not a usable JSON schema: {exc}") from exc
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, llg)
    if is_error:
        raise SchemaError(f"{where}: not a usable JSON schema: {'; '.join(messages)}")


def compile_schema(tokenizer, schema: Mapping[str, Any], where: str = "json_schema") -> CompiledSchema:
    """``schema`` compiled for ``tokenizer`` (cached by tokenizer and schema digest).
    SchemaError names ``where`` (a file or a request field) when llguidance refuses it."""
    from llguidance import LLMatcher

    if not isinstance(schema, Mapping):
        raise SchemaError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    digest = schema_digest(schema)
    with _LOCK:
        hit = _GRAMMARS.get(tokenizer, {}).get(digest)
    if hit is not None:
        return hit
    check_schema(schema, where, llg_tokenizer(tokenizer))
    # Whitespace before the object is allowed too: a model that opens its answer with a newline
    # keeps its own greedy path (answers are stripped afterwards).
    options = {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    lark = "start: LEAD? answer\nLEAD: /[ \\t\\r\\n]{1,8}/\nanswer: %json "
    grammar = LLMatcher.grammar_from_lark(lark + json.dumps({**schema, "x-guidance": options}))
    compiled = CompiledSchema(grammar, digest, where, llg_tokenizer(tokenizer), int(tokenizer.eos_token_id))
    with _LOCK:
        _GRAMMARS.setdefault(tokenizer, {})[digest] = compiled
    return compiled


class RowMatcher:
    """One conversation's progress through a compiled schema."""

    def __init__(self, compiled: CompiledSchema):
        from llguidance import LLMatcher

        self.compiled = compiled
        self._m = LLMatcher(compiled.llg_tokenizer, compiled.grammar, log_level=0)
        if self._m.is_error():
            raise SchemaError(f"{compiled.where}: {self._m.get_error()}")

    def fill(self, bitmask, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of an ``llguidance.torch`` bit mask."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self._m, bitmask, row)

    def advance(self, token: int) -> None:
        """Feed the chosen token; a token outside the grammar is a bug in the masking."""
        if not self._m.consume_token(int(token)):
            raise RuntimeError(f"{self.compiled.where}: token {token} is outside the schema's grammar "
                               f"({self._m.get_error()})")

    @property
    def complete(self) -> bool:
        """The JSON is finished and nothing but the end of turn may follow."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()


def apply_bitmask(logits, bitmask, rows: Sequence[int]) -> None:
    """Set to -inf the logits of ``rows`` (of a [batch, vocab] tensor) that their bit mask
    rows forbid; logits past the tokenizer's vocabulary (padding columns) are forbidden too."""
    import numpy as np
    import torch

    if not rows:
        return
    index = torch.tensor(list(rows), dtype=torch.long)
    bits = np.unpackbits(bitmask.index_select(0, index).numpy().view(np.uint8), axis=1, bitorder="little")
    allowed = torch.zeros((len(rows), logits.shape[1]), dtype=torch.bool)
    width = min(bits.shape[1], logits.shape[1])
    allowed[:, :width] = torch.from_numpy(bits[:, :width].astype(bool))
    index = index.to(logits.device)
    part = logits.index_select(0, index).masked_fill(~allowed.to(logits.device), float("-inf"))
    logits.index_copy_(0, index, part)


def mask_logits(logits, matchers: Sequence[RowMatcher | None]) -> None:
    """Mask row r of ``logits`` ([rows, vocab]) with ``matchers[r]``; rows without one are untouched."""
    from llguidance.torch import allocate_token_bitmask

    rows = [r for r, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = allocate_token_bitmask(len(matchers), matchers[rows[0]].compiled.llg_tokenizer.vocab_size)
    for r in rows:
        matchers[r].fill(bitmask, r)  # a complete row: the end of turn alone
    apply_bitmask(logits, bitmask, rows)


def schemas_for(tokenizer, json_schema, rows: int, where: str = "json_schema") -> list[CompiledSchema | None]:
    """Per-row compiled schemas from ``json_schema``: None (no row constrained), one schema for
    every row, or a list with one schema (or None) per row."""
    if json_schema is None:
        return [None] * rows
    if isinstance(json_schema, Mapping):
        compiled = compile_schema(tokenizer, json_schema, where)
        return [compiled] * rows
    if len(json_schema) != rows:
        raise ValueError(f"{where} has {len(json_schema)} entries for {rows} conversations")
    return [None if s is None else compile_schema(tokenizer, s, f"{where}[{i}]") for i, s in enumerate(json_schema)]
