"""A task's output JSON schema and its one validator.

Label files, the marts' data-quality checks and the live-answer checks of monitoring all judge
an answer object by this validator (``jsonschema``, the draft the schema names, 2020-12 when it
names none), so "valid" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.validators import validator_for


class OutputSchemaError(ValueError):
    """The output schema itself is malformed."""


@dataclass(frozen=True)
class SchemaIssue:
    """One way an answer breaks the schema; ``field`` is the path to the value ("" for the object)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class OutputSchema:
    """An object schema with named ``properties`` (the task's output fields, in schema order)."""

    def __init__(self, schema: Mapping[str, Any], where: str = "output schema") -> None:
        props = schema.get("properties") if isinstance(schema, Mapping) else None
        if not isinstance(props, Mapping) or not props:
            raise OutputSchemaError(f"{where}: needs an object schema with 'properties'")
        cls = validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            raise OutputSchemaError(f"{where}: not a valid JSON schema{f' at {path}' if path else ''}: "
                                    f"{exc.message}") from exc
        self.schema: dict[str, Any] = dict(schema)
        self.fields: tuple[str, ...] = tuple(props)
        self._validator = cls(self.schema)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutputSchema) and other.schema == self.schema

    __hash__ = None  # type: ignore[assignment]  # a schema is a mutable mapping

    def __reduce__(self):
        return OutputSchema, (self.schema,)  # the validator is rebuilt: it does not pickle

    def errors(self, value: Any) -> list[SchemaIssue]:
        """Every way ``value`` breaks the schema, sorted by field; empty when it conforms."""
        found = [SchemaIssue("/".join(map(str, e.absolute_path)), e.message)
                 for e in self._validator.iter_errors(value)]
        return sorted(found, key=lambda issue: (issue.field, issue.message))

    def is_valid(self, value: Any) -> bool:
        return self._validator.is_valid(value)
