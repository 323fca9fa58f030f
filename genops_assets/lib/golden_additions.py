"""Accepted golden proposals: reviewed live items a person moved into the golden set.

``accept`` appends one proposal of the ``golden_proposals`` mart to the task's
``golden_additions.jsonl`` (a task data file that dbt staging always puts in the golden set),
as a row of the task's own format: the input field and the output fields. Nothing is accepted
automatically; the file is rewritten through a temporary file, and a proposal already there is
not added twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from genops_assets.lib.hashing import atomic_write_text
from genops_assets.lib.jsonl import iter_jsonl
from genops_assets.lib.tasks import GOLDEN_ADDITIONS, TaskSpec


class ProposalError(ValueError):
    """A proposal that cannot be accepted (unknown id, output not valid by the task's schema)."""


def accept(spec: TaskSpec, proposal: Mapping[str, Any]) -> tuple[Path, bool]:
    """Append ``proposal`` (a golden_proposals row) to the task's golden additions; returns the
    file and whether a row was added (False: that input is already there)."""
    try:
        output = json.loads(proposal["output_json"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ProposalError(f"proposal {proposal.get('proposal_id')}: output_json is not JSON: {exc}") from exc
    errors = spec.output_schema.errors(output) if isinstance(output, dict) else ["not a JSON object"]
    if errors:
        raise ProposalError(f"proposal {proposal.get('proposal_id')}: the output is not valid by the output schema "
                            f"of task '{spec.name}': {'; '.join(map(str, errors))}")
    path = spec.root / GOLDEN_ADDITIONS
    rows = [row for _, row in iter_jsonl(path)] if path.is_file() else []
    if any(r.get(spec.input_field) == proposal["input_text"] for r in rows):
        return path, False
    rows.append({spec.input_field: proposal["input_text"], **{f: output.get(f) for f in spec.output_fields},
                 "proposal_id": proposal["proposal_id"]})
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path, True
