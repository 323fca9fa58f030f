"""Turn task examples into chat messages and targets, and model text back into fields.

Training, offline evaluation and serving all build prompts here, so the three agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from genops_assets.lib.prompts import CONTEXTS_VARIABLE, FEW_SHOT_VARIABLE, PromptTemplate
from genops_assets.lib.tasks import TaskSpec

Message = dict[str, str]


def format_target(output: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The canonical assistant answer: one JSON object, keys in schema order."""
    return json.dumps({f: output.get(f) for f in fields}, ensure_ascii=False)


def format_few_shot(task: TaskSpec, shots: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Render worked examples for the ``{few_shot}`` slot; empty when there are none."""
    if not shots:
        return ""
    blocks = [
        f"Message: {text}\nAnswer: {format_target(out, task.output_fields)}" for text, out in shots
    ]
    return "Examples:\n" + "\n\n".join(blocks) + "\n\n"


def build_messages(
    task: TaskSpec,
    input_text: str,
    shots: Sequence[tuple[str, Mapping[str, Any]]] = (),
    prompt: PromptTemplate | None = None,
    contexts: Sequence[str] = (),
) -> list[Message]:
    """Chat messages for one input: ``prompt`` (a registered version) or the task folder's.
    ``contexts``: the example's retrieved passages, for tasks whose prompt shows them."""
    template = prompt or task.prompt
    return template.render(prompt_variables(task, input_text, contexts, template)
                           | {FEW_SHOT_VARIABLE: format_few_shot(task, shots)})


def prompt_variables(task: TaskSpec, input_text: str, contexts: Sequence[str] = (),
                     prompt: PromptTemplate | None = None) -> dict[str, str | list[str]]:
    """What a client sends the endpoint as ``prompt_variables`` for one input."""
    template = prompt or task.prompt
    variables: dict[str, str | list[str]] = {template.input_field: input_text}
    if contexts:
        variables[CONTEXTS_VARIABLE] = list(contexts)
    return variables


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)


def parse_prediction(text: str, fields: Sequence[str], lenient: bool = False) -> dict[str, Any] | None:
    """Parse a model answer into a dict of the task's fields, or None if it is not valid JSON.

    Strict (the default): tolerates a code fence and text after the object (small models
    often add some), but the answer must start with the object. Lenient: the first JSON
    object anywhere in the text, as a forgiving consumer would extract it.
    """
    cleaned = _FENCE.sub("", text.strip()).strip()
    starts = [0] if cleaned.startswith("{") else []
    if lenient:
        starts += [i for i, ch in enumerate(cleaned) if ch == "{" and i > 0]
    decoder = json.JSONDecoder()
    for start in starts:
        try:
            obj, _ = decoder.raw_decode(cleaned[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return {f: obj.get(f) for f in fields} | {"_extra_keys": sorted(set(obj) - set(fields))}
    return None
