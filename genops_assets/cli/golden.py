"""`genops golden ...`: list the golden proposals of a task and accept one into its golden set."""

from __future__ import annotations

from pathlib import Path


def _proposals(db: Path, task: str, proposal_id: str | None = None):
    import duckdb

    from resources.warehouse import mart_schema

    if not db.is_file():
        raise SystemExit(f"{db} does not exist: run the task's loop (make demo) so the golden_proposals mart is built")
    sql = f"select * from {mart_schema(task)}.golden_proposals"
    try:
        with duckdb.connect(str(db), read_only=True) as con:
            if proposal_id is None:
                return con.execute(sql + " order by last_rated_at desc, proposal_id").df()
            return con.execute(sql + " where proposal_id = ?", [proposal_id]).df()
    except duckdb.CatalogException as exc:
        raise SystemExit(f"{db}: no golden_proposals mart for task '{task}' (run the task's loop): {exc}") from exc


def golden_command(args) -> int:
    from genops_assets.lib.golden_additions import ProposalError, accept
    from genops_assets.lib.tasks import load_task
    from resources.settings import GenopsSettings

    settings = GenopsSettings.from_env()
    spec = load_task(settings.tasks_dir, args.task or settings.task)
    db = Path(settings.home) / "warehouse.duckdb"
    if args.golden_cmd == "list":
        df = _proposals(db, spec.name)
        if df.empty:
            print(f"no golden proposals for task '{spec.name}'")
        for r in df.itertuples():
            print(f"{r.proposal_id}  {r.n_raters}/{r.n_ratings} raters  {r.input_text[:60]!r} -> {r.output_json}")
        return 0
    df = _proposals(db, spec.name, args.proposal_id)
    if df.empty:
        raise SystemExit(f"no golden proposal '{args.proposal_id}' for task '{spec.name}' in {db} "
                         "(`genops golden list` shows them)")
    try:
        path, added = accept(spec, df.iloc[0].to_dict())
    except ProposalError as exc:
        raise SystemExit(str(exc)) from exc
    print(f"added to {path}: the golden set includes it from the next loop run" if added
          else f"proposal {args.proposal_id}: that input is already in {path}")
    return 0
