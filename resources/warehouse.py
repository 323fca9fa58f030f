"""DuckDB warehouse shared with the dbt project (dbt-duckdb writes to the same file)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

RAW_SCHEMA = "raw"
RAW_TABLE = "task_examples"
# Columns of raw.task_examples after ``task``; passages are JSON lists (NULL when a task has none).
RAW_COLUMNS = (("source_file", "varchar"), ("source_row", "integer"), ("input_text", "varchar"),
               ("output_json", "varchar"), ("contexts_json", "varchar"), ("reference_contexts_json", "varchar"),
               ("loaded_at", "timestamp"))
FEEDBACK_SCHEMA = "feedback"


def mart_schema(task: str) -> str:
    """Where dbt builds a task's staging table and marts (golden_eval_dataset, sft_dataset,
    few_shot_examples): one schema per task, so tasks never replace each other's tables
    (dbt/macros/generate_schema_name.sql names it the same way)."""
    return f"marts_{task}"


def monitoring_schema(task: str) -> str:
    """Where a task's monitoring assets keep their daily tables."""
    return f"monitoring_{task}"


class DuckDBWarehouse(dg.ConfigurableResource):
    """A DuckDB file; connections are short-lived so dbt and checks can take turns."""

    path: str
    lock_retry_s: float = 30.0

    def _connect(self, read_only: bool):
        import duckdb

        deadline = time.monotonic() + self.lock_retry_s
        while True:
            try:
                return duckdb.connect(self.path, read_only=read_only)
            except duckdb.IOException as exc:
                # Another process (dbt, a check) holds the file lock: wait briefly, then fail loudly.
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise RuntimeError(f"cannot open DuckDB file {self.path}: {exc}") from exc
                time.sleep(0.5)

    def query_df(self, sql: str, params: Sequence[Any] | None = None):
        con = self._connect(read_only=True)
        try:
            return con.execute(sql, params or []).df()
        finally:
            con.close()

    def table_exists(self, schema: str, table: str) -> bool:
        con = self._connect(read_only=True)
        try:
            n = con.execute(
                "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
                [schema, table],
            ).fetchone()[0]
            return n > 0
        finally:
            con.close()

    def replace_raw_examples(self, task: str, rows: Sequence[tuple]) -> int:
        """Replace the task's rows of raw.task_examples in one transaction. A row is
        (source_file, source_row, input_text, output_json[, contexts_json, reference_contexts_json]);
        the passages are NULL for a task whose examples carry none."""
        width = len(RAW_COLUMNS) - 1  # every column but loaded_at
        odd = [r for r in rows if len(r) not in (width - 2, width)]
        if odd:
            raise ValueError(f"{RAW_SCHEMA}.{RAW_TABLE}: a row has {width - 2} or {width} values, got {odd[0]!r}")
        con = self._connect(read_only=False)
        try:
            _ensure_table(con, RAW_SCHEMA, RAW_TABLE, [("task", "varchar"), *RAW_COLUMNS])
            names = ", ".join(["task", *(n for n, _ in RAW_COLUMNS)])
            marks = ", ".join(["?"] * width)
            con.execute("begin transaction")
            con.execute(f"delete from {RAW_SCHEMA}.{RAW_TABLE} where task = ?", [task])
            con.executemany(
                f"insert into {RAW_SCHEMA}.{RAW_TABLE} ({names}) values (?, {marks}, current_timestamp)",
                [(task, *r, *([None] * (width - len(r)))) for r in rows],
            )
            con.execute("commit")
            return len(rows)
        finally:
            con.close()

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        con = self._connect(read_only=False)
        try:
            con.execute(sql, params or [])
        finally:
            con.close()

    def append_feedback(self, source: str, chunk, columns) -> int:
        """Append request rows and move the source's offset in one transaction: a row is loaded
        exactly once, even if the process dies between the two."""
        con = self._connect(read_only=False)
        try:
            _ensure_table(con, FEEDBACK_SCHEMA, "requests", [*columns, ("loaded_at", "timestamp")])
            con.execute(f"""create table if not exists {FEEDBACK_SCHEMA}.ingest_state (
                source varchar primary key, byte_offset bigint, updated_at timestamp)""")
            con.execute("begin transaction")
            # Another ingestion may have committed since this chunk was read: keep only the lines
            # it has not loaded (each row carries its byte offset in the source file).
            stored = con.execute(f"select byte_offset from {FEEDBACK_SCHEMA}.ingest_state where source = ?",
                                 [source]).fetchone()
            rows, end = chunk.rows, chunk.end
            if stored is not None and not chunk.rotated:
                at = [n for n, _ in columns].index("source_offset")
                rows = [r for r in rows if r[at] >= stored[0]]
                end = max(end, stored[0])
            if rows:
                names = ", ".join(n for n, _ in columns)
                marks = ", ".join("?" for _ in columns)
                con.executemany(f"insert into {FEEDBACK_SCHEMA}.requests ({names}, loaded_at) "
                                f"values ({marks}, current_timestamp)", rows)
            con.execute(f"insert or replace into {FEEDBACK_SCHEMA}.ingest_state values (?, ?, current_timestamp)",
                        [source, end])
            con.execute("commit")
            return len(rows)
        finally:
            con.close()

    def feedback_offset(self, source: str) -> int:
        if not Path(self.path).exists() or not self.table_exists(FEEDBACK_SCHEMA, "ingest_state"):
            return 0
        df = self.query_df(f"select byte_offset from {FEEDBACK_SCHEMA}.ingest_state where source = ?", [source])
        return int(df.iloc[0, 0]) if len(df) else 0

    def replace_partition(self, schema: str, table: str, columns: Sequence[tuple[str, str]], key_column: str,
                          key: Any, rows: Sequence[tuple]) -> int:
        """Replace the rows of ``schema.table`` whose ``key_column`` equals ``key`` by ``rows`` (values
        in ``columns`` order) in one transaction; the table, and columns it lacks, are created first."""
        return self.replace_partitions(schema, key_column, key, {table: (columns, rows)})[table]

    def replace_partitions(self, schema: str, key_column: str, key: Any,
                           tables: Mapping[str, tuple[Sequence[tuple[str, str]], Sequence[tuple]]]) -> dict[str, int]:
        """``replace_partition`` for several tables (name -> (columns, rows)) in ONE transaction: a
        reader never sees one table of a partition replaced and the other not."""
        for table, (columns, _) in tables.items():
            if key_column not in [n for n, _ in columns]:
                raise ValueError(f"{schema}.{table}: key column '{key_column}' is not among "
                                 f"{[n for n, _ in columns]}")
        con = self._connect(read_only=False)
        try:
            for table, (columns, _) in tables.items():
                _ensure_table(con, schema, table, columns)
            con.execute("begin transaction")
            try:
                for table, (columns, rows) in tables.items():
                    names = [n for n, _ in columns]
                    con.execute(f"delete from {schema}.{table} where {key_column} = ?", [key])
                    if rows:
                        con.executemany(f"insert into {schema}.{table} ({', '.join(names)}) "
                                        f"values ({', '.join('?' for _ in names)})", list(rows))
                con.execute("commit")
            except BaseException:
                con.execute("rollback")
                raise
            return {table: len(rows) for table, (_, rows) in tables.items()}
        finally:
            con.close()


def _ensure_table(con, schema: str, table: str, columns: Sequence[tuple[str, str]]) -> None:
    """Create ``schema.table`` if missing; a table written by an older genops gains new columns."""
    con.execute(f"create schema if not exists {schema}")
    con.execute(f"create table if not exists {schema}.{table} ({', '.join(f'{n} {t}' for n, t in columns)})")
    for name, kind in columns:
        con.execute(f"alter table {schema}.{table} add column if not exists {name} {kind}")
