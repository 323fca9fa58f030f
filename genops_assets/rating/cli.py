"""The rating server: ``python -m genops_assets.rating.cli [--port 8090]`` (``make feedback``).

Serves the rating UI and API on the data directory's rating store
(``<GENOPS_HOME>/feedback/ratings.sqlite``) and the task folders (``GENOPS_TASKS_DIR``).
Raters are created with ``genops raters add NAME``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PORT_ENV = "FEEDBACK_PORT"
DEFAULT_PORT = 8090


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genops-feedback", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get(PORT_ENV) or DEFAULT_PORT),
                   help=f"default {PORT_ENV} or {DEFAULT_PORT}")
    p.add_argument("--home", type=Path, default=None, help="the data directory (default GENOPS_HOME)")
    p.add_argument("--tasks-dir", type=Path, default=None, help="the task folders (default GENOPS_TASKS_DIR)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from resources.settings import GenopsSettings

    settings = GenopsSettings.from_env()
    import uvicorn

    from genops_assets.lib.ratings import RatingStore, store_path
    from genops_assets.rating.app import create_app
    from genops_assets.rating.service import RatingService

    store = RatingStore(store_path((args.home or settings.home).resolve()))
    service = RatingService(store, args.tasks_dir or settings.tasks_dir)
    print(f"genops ratings: http://{args.host}:{args.port}/ (store {store.path}, tasks {service.tasks()})",
          flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
