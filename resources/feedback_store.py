"""The feedback store: the endpoint's request records, and how far into each request log
ingestion has read, kept together so a line is loaded exactly once.

``DuckDBFeedbackStore`` keeps them in the local warehouse (the monitoring assets and dbt read
that file); ``BigQueryFeedbackStore`` keeps them in a BigQuery dataset (the cloud profile).
google-cloud-bigquery is imported only inside the BigQuery store's methods, so loading the
definitions does not pay for it.
"""

from __future__ import annotations

import re
import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from resources.warehouse import FEEDBACK_SCHEMA, DuckDBWarehouse

Columns = Sequence[tuple[str, str]]

# DuckDB column types of genops_assets.lib.feedback.COLUMNS -> BigQuery types.
BIGQUERY_TYPES = {"varchar": "STRING", "timestamp": "TIMESTAMP", "integer": "INT64", "bigint": "INT64",
                  "double": "FLOAT64"}
# A load's staging table is dropped after the load; the expiry removes one a crash left behind.
STAGING_EXPIRY = timedelta(hours=24)
_PROJECT_ID = re.compile(r"^[a-z][a-z0-9.:-]{4,61}[a-z0-9]$")
_DATASET_ID = re.compile(r"^[A-Za-z0-9_]{1,1024}$")


@dataclass(frozen=True)
class RequestQuery:
    """A read of the requests table, written once for every store's SQL dialect. Column names
    are checked against the table's columns; every value travels as a query parameter.

    ``task``: the task's rows and those that name no task; ``start``/``end``: ``ts`` in
    [start, end); ``requests_only``: request events (not other events the endpoint logs);
    ``not_null`` / ``non_blank``: columns that must hold a value / a non-blank text;
    ``request_ids``: only these requests; ``order_by``: columns, each optionally ``" desc"``."""

    columns: tuple[str, ...]
    task: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    requests_only: bool = False
    status: int | None = None
    not_null: tuple[str, ...] = ()
    non_blank: tuple[str, ...] = ()
    request_ids: tuple[str, ...] | None = None
    order_by: tuple[str, ...] = ("ts", "request_id")
    limit: int | None = None

    def sql(self, table: str, mark: Callable[[object], str]) -> str:
        """The SELECT on ``table``; ``mark(value)`` records a parameter and returns its placeholder
        (a tuple of request ids: the placeholder of a list, usable after ``in``)."""
        from genops_assets.lib.feedback import COLUMNS

        known = {name for name, _ in COLUMNS}
        order = [o.removesuffix(" desc") for o in self.order_by]
        unknown = sorted({*self.columns, *self.not_null, *self.non_blank, *order} - known)
        if unknown or not self.columns:
            raise ValueError(f"request query: unknown columns {unknown} (the requests table has {sorted(known)})")
        where = []
        if self.requests_only:
            where.append("coalesce(event, 'request') = 'request'")
        if self.status is not None:
            where.append(f"status = {mark(int(self.status))}")
        if self.start is not None:
            where.append(f"ts >= {mark(self.start)}")
        if self.end is not None:
            where.append(f"ts < {mark(self.end)}")
        if self.task is not None:
            where.append(f"(task = {mark(self.task)} or task is null)")
        if self.request_ids is not None:
            where.append(f"request_id in {mark(tuple(str(r) for r in self.request_ids))}")
        where += [f"{c} is not null" for c in self.not_null]
        where += [f"trim({c}) <> ''" for c in self.non_blank]
        sql = f"select {', '.join(self.columns)} from {table}"
        if where:
            sql += " where " + " and ".join(where)
        if self.order_by:
            sql += " order by " + ", ".join(self.order_by)
        if self.limit is not None:
            sql += f" limit {int(self.limit)}"
        return sql


def _frame(rows: Sequence[Sequence[Any]], columns: Sequence[str]):
    """Rows as a DataFrame; timestamps as naive UTC, the way the local warehouse stores ``ts``."""
    import pandas as pd

    df = pd.DataFrame.from_records([tuple(r) for r in rows], columns=list(columns))
    for name in df.columns:
        if isinstance(df[name].dtype, pd.DatetimeTZDtype):
            df[name] = df[name].dt.tz_convert(UTC).dt.tz_localize(None)
    return df


class FeedbackStore(dg.ConfigurableResource):
    """Where request records land: one table of rows plus a byte offset per source file."""

    redactor: str | None = Field(None, description="module:function each record passes before it is stored")

    @abstractmethod
    def offset(self, source: str) -> int:
        """The byte offset of ``source`` that ingestion has loaded up to (0 before the first load)."""

    @abstractmethod
    def append(self, source: str, chunk, columns: Columns) -> int:
        """Append ``chunk.rows`` (values in ``columns`` order) and move the offset of ``source`` to
        ``chunk.end`` in one transaction. Rows whose ``source_offset`` is below the offset stored
        when the transaction runs were loaded by an overlapping ingestion and are dropped, so each
        line is stored once. Returns the number of rows stored."""

    @abstractmethod
    def count(self) -> int:
        """Rows in the requests table (0 before the first load)."""

    @abstractmethod
    def has_requests(self) -> bool:
        """Whether the requests table exists (false before the first load of a local store)."""

    @abstractmethod
    def requests(self, query: RequestQuery):
        """The rows ``query`` selects as a pandas DataFrame (``ts`` naive UTC); an empty frame
        with the query's columns before the first load."""

    @property
    @abstractmethod
    def table_ref(self) -> str:
        """The requests table's name, for metadata and logs."""


class DuckDBFeedbackStore(FeedbackStore):
    """``feedback.requests`` and ``feedback.ingest_state`` in the local DuckDB warehouse."""

    warehouse: DuckDBWarehouse

    def offset(self, source: str) -> int:
        return self.warehouse.feedback_offset(source)

    def append(self, source: str, chunk, columns: Columns) -> int:
        return self.warehouse.append_feedback(source, chunk, columns)

    def count(self) -> int:
        if not self.has_requests():
            return 0
        return int(self.warehouse.query_df(f"select count(*) from {FEEDBACK_SCHEMA}.requests").iloc[0, 0])

    def has_requests(self) -> bool:
        return Path(self.warehouse.path).exists() and self.warehouse.table_exists(FEEDBACK_SCHEMA, "requests")

    def requests(self, query: RequestQuery):
        if not self.has_requests():
            return _frame([], query.columns)
        params: list[Any] = []

        def mark(value: object) -> str:
            if isinstance(value, tuple):
                params.extend(value)
                return "(" + ", ".join("?" for _ in value) + ")" if value else "(select null where false)"
            params.append(value.astimezone(UTC).replace(tzinfo=None)
                          if isinstance(value, datetime) and value.tzinfo else value)
            return "?"

        return self.warehouse.query_df(query.sql(f"{FEEDBACK_SCHEMA}.requests", mark), params)

    @property
    def table_ref(self) -> str:
        return f"{FEEDBACK_SCHEMA}.requests"


def bigquery_type(name: str, kind: str) -> str:
    try:
        return BIGQUERY_TYPES[kind.lower()]
    except KeyError:
        raise ValueError(f"column '{name}': no BigQuery type for '{kind}' (known: {sorted(BIGQUERY_TYPES)})") from None


class BigQueryFeedbackStore(FeedbackStore):
    """``<dataset>.requests`` and ``<dataset>.ingest_state`` in BigQuery; the dataset and tables
    are created on first use, and columns the requests table lacks are added.

    Why a multi-statement transaction: rows and offset must change together, and BigQuery
    commits the DML statements of one ``BEGIN TRANSACTION ... COMMIT TRANSACTION`` script
    atomically (a failing statement rolls the whole transaction back). Streaming inserts or a
    load job straight into ``requests`` could not be tied to the offset update. Inside the
    transaction the INSERT re-reads the stored offset, so rows an overlapping ingestion already
    committed are dropped; and since every ingestion after the first UPDATEs the source's
    ``ingest_state`` row, BigQuery does not let two concurrent transactions both commit: the
    one cancelled fails its run, and the next ingestion loads only what is left.

    Why a staging table: the rows go in by a load job (no request-size ceiling, unlike rows sent
    as query parameters) into a table of their own, read by ``INSERT ... SELECT`` inside the
    transaction, and dropped afterwards. Values only ever travel as load data or query
    parameters, never inside the SQL text.
    """

    bigquery: dg.ConfigurableResource = Field(
        description="A dagster_gcp BigQueryResource (project, location; credentials from gcp_credentials "
                    "or application default credentials). Typed by its base class so that loading the "
                    "definitions does not import google-cloud-bigquery.")
    dataset: str = Field(default="genops_feedback", description="BigQuery dataset of the feedback tables.")

    _ready: bool = PrivateAttr(default=False)

    # -- names ---------------------------------------------------------------------------------

    def _project(self) -> str:
        project = getattr(self.bigquery, "project", None)
        if not project:
            raise ValueError("BigQueryFeedbackStore needs the BigQueryResource's project (GENOPS_GCP_PROJECT)")
        if not _PROJECT_ID.match(project):
            raise ValueError(f"BigQuery project {project!r} is not a valid project id")
        if not _DATASET_ID.match(self.dataset):
            raise ValueError(f"BigQuery dataset {self.dataset!r} may hold only letters, digits and underscores")
        return project

    def _table(self, name: str) -> str:
        return f"{self._project()}.{self.dataset}.{name}"

    @property
    def table_ref(self) -> str:
        return self._table("requests")

    @contextmanager
    def _client(self) -> Iterator[Any]:
        from dagster_gcp import BigQueryResource

        if not isinstance(self.bigquery, BigQueryResource):
            raise TypeError(f"BigQueryFeedbackStore.bigquery must be a dagster_gcp BigQueryResource, "
                            f"got {type(self.bigquery).__name__}")
        with self.bigquery.get_client() as client:
            if not self._ready:
                self._create_tables(client)
                self._ready = True
            yield client

    # -- schema --------------------------------------------------------------------------------

    def _create_tables(self, client) -> None:
        from google.api_core.exceptions import NotFound
        from google.cloud import bigquery

        from genops_assets.lib.feedback import COLUMNS

        project = self._project()
        try:
            client.get_dataset(f"{project}.{self.dataset}")
        except NotFound:
            ds = bigquery.Dataset(f"{project}.{self.dataset}")
            if getattr(self.bigquery, "location", None):
                ds.location = self.bigquery.location
            client.create_dataset(ds, exists_ok=True)
        self._ensure_table(client, "requests",
                           [*self._schema(COLUMNS), bigquery.SchemaField("loaded_at", "TIMESTAMP")])
        self._ensure_table(client, "ingest_state", [bigquery.SchemaField("source", "STRING", mode="REQUIRED"),
                                                     bigquery.SchemaField("byte_offset", "INT64", mode="REQUIRED"),
                                                     bigquery.SchemaField("updated_at", "TIMESTAMP")])

    @staticmethod
    def _schema(columns: Columns) -> list:
        from google.cloud import bigquery

        return [bigquery.SchemaField(name, bigquery_type(name, kind)) for name, kind in columns]

    def _ensure_table(self, client, name: str, schema: list) -> None:
        from google.api_core.exceptions import NotFound
        from google.cloud import bigquery

        try:
            table = client.get_table(self._table(name))
        except NotFound:
            client.create_table(bigquery.Table(self._table(name), schema=schema), exists_ok=True)
            return
        have = {f.name for f in table.schema}
        missing = [f for f in schema if f.name not in have]
        if missing:  # a store written by an older genops gains the new (nullable) columns
            table.schema = [*table.schema, *missing]
            client.update_table(table, ["schema"])

    # -- reads ---------------------------------------------------------------------------------

    @staticmethod
    def _params(**values) -> Any:
        from google.cloud import bigquery

        return bigquery.QueryJobConfig(query_parameters=[_parameter(name, value) for name, value in values.items()])

    def has_requests(self) -> bool:
        return True  # created on first use

    def requests(self, query: RequestQuery):
        values: dict[str, object] = {}

        def mark(value: object) -> str:
            name = f"p{len(values)}"
            values[name] = value
            return f"UNNEST(@{name})" if isinstance(value, tuple) else f"@{name}"

        sql = query.sql(f"`{self.table_ref}`", mark)
        with self._client() as client:
            return _frame(list(client.query(sql, job_config=self._params(**values)).result()), query.columns)

    def offset(self, source: str) -> int:
        state = self._table("ingest_state")
        with self._client() as client:
            rows = list(client.query(f"SELECT MAX(byte_offset) FROM `{state}` WHERE source = @source",
                                     job_config=self._params(source=source)).result())
            stored = rows[0][0] if rows else None
            if stored is not None:
                return int(stored)
            # The source's state row exists before its first load, so every load UPDATEs it and
            # two overlapping loads conflict (see the class docstring) rather than both inserting.
            client.query(f"INSERT INTO `{state}` (source, byte_offset, updated_at) "
                         f"SELECT @source, 0, CURRENT_TIMESTAMP() FROM UNNEST([1]) "
                         f"WHERE NOT EXISTS (SELECT 1 FROM `{state}` WHERE source = @source)",
                         job_config=self._params(source=source)).result()
            return 0

    def count(self) -> int:
        with self._client() as client:
            rows = list(client.query(f"SELECT COUNT(*) FROM `{self._table('requests')}`").result())
            return int(rows[0][0])

    # -- the transaction -----------------------------------------------------------------------

    def append(self, source: str, chunk, columns: Columns) -> int:
        from google.cloud import bigquery

        if not chunk.rows and not chunk.rotated and chunk.end == chunk.start:
            return 0  # nothing read: no transaction to pay for
        names = [n for n, _ in columns]
        if "source_offset" not in names:
            raise ValueError(f"feedback columns need 'source_offset' (the line's byte offset), got {names}")
        with self._client() as client:
            staging = None
            try:
                if chunk.rows:
                    staging = self._table(f"requests_load_{uuid.uuid4().hex}")
                    table = bigquery.Table(staging, schema=self._schema(columns))
                    table.expires = datetime.now(UTC) + STAGING_EXPIRY
                    client.create_table(table)
                    config = bigquery.LoadJobConfig(schema=self._schema(columns),
                                                    source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON,
                                                    write_disposition=bigquery.WriteDisposition.WRITE_APPEND)
                    client.load_table_from_json([_json_row(names, r) for r in chunk.rows], staging,
                                                job_config=config).result()
                script = append_script(self._table("requests"), self._table("ingest_state"), staging, names)
                rows = list(client.query(script, job_config=self._params(
                    source=source, end_offset=int(chunk.end), rotated=bool(chunk.rotated))).result())
                return int(rows[0][0])
            finally:
                if staging is not None:
                    client.delete_table(staging, not_found_ok=True)


def append_script(requests: str, state: str, staging: str | None, names: Sequence[str]) -> str:
    """The script of one load: rows from ``staging`` (if any) and the offset, in one transaction.
    Parameters: @source, @end_offset, @rotated. A rotated file starts over at its first line, so
    all its rows are new and its offset replaces the stored one."""
    cols = ", ".join(names)
    insert = ""
    if staging is not None:
        insert = (f"INSERT INTO `{requests}` ({cols}, loaded_at)\n"
                  f"SELECT {cols}, CURRENT_TIMESTAMP() FROM `{staging}`\n"
                  f"WHERE @rotated OR source_offset >= "
                  f"IFNULL((SELECT MAX(byte_offset) FROM `{state}` WHERE source = @source), 0);\n"
                  f"SET loaded = @@row_count;\n")
    return ("DECLARE loaded INT64 DEFAULT 0;\n"
            "BEGIN TRANSACTION;\n"
            f"{insert}"
            f"MERGE `{state}` AS target\n"
            "USING (SELECT @source AS source, @end_offset AS byte_offset) AS incoming\n"
            "ON target.source = incoming.source\n"
            "WHEN MATCHED THEN UPDATE SET byte_offset = IF(@rotated, incoming.byte_offset, "
            "GREATEST(target.byte_offset, incoming.byte_offset)), updated_at = CURRENT_TIMESTAMP()\n"
            "WHEN NOT MATCHED THEN INSERT (source, byte_offset, updated_at) "
            "VALUES (incoming.source, incoming.byte_offset, CURRENT_TIMESTAMP());\n"
            "COMMIT TRANSACTION;\n"
            "SELECT loaded;")


BIGQUERY_PARAMETER_TYPES = {str: "STRING", int: "INT64", bool: "BOOL", float: "FLOAT64"}


def _parameter(name: str, value: object):
    """A query parameter of the value's BigQuery type (a tuple: an array of strings); naive
    datetimes are UTC."""
    from google.cloud import bigquery

    if isinstance(value, tuple):
        return bigquery.ArrayQueryParameter(name, "STRING", [str(v) for v in value])
    if isinstance(value, datetime):
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return bigquery.ScalarQueryParameter(name, "TIMESTAMP", value)
    return bigquery.ScalarQueryParameter(name, BIGQUERY_PARAMETER_TYPES[type(value)], value)


def _json_row(names: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    """A row as load-job JSON; naive timestamps are UTC (as ``to_row`` makes them)."""
    if len(row) != len(names):
        raise ValueError(f"request row has {len(row)} values for {len(names)} columns (row {row[:1]!r}...)")
    out = {}
    for name, value in zip(names, row, strict=True):
        if isinstance(value, datetime):
            out[name] = (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat(sep=" ")
        else:
            out[name] = value
    return out
