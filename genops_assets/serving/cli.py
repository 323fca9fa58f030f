"""The endpoint process: ``python -m genops_assets.serving.cli --base-model DIR --state-dir DIR``.

Started and stopped by ``genops_assets.serving.control``. What the model serves and where the
process keeps its state are options here; how it serves (batching, limits, canary share,
sampling) are the ``ServerSettings``, each an option with a ``GENOPS_*`` environment default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genops_assets.serving.protocol import CHAMPION
from genops_assets.serving.settings import API_KEYS_ENV, ServerSettings


def _pairs(parser: argparse.ArgumentParser, option: str, items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"{option} {item!r}: expected name=value")
        pairs[name] = value
    return pairs


def parser(defaults: ServerSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="genops OpenAI-compatible endpoint "
                                                 f"(API keys: {API_KEYS_ENV}, comma-separated)")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--adapter", action="append", default=[], help="name=folder")
    parser.add_argument("--version", action="append", default=[], help="name=version")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8008)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--watch-registry", default=None, help="MLflow tracking URI whose aliases to follow")
    parser.add_argument("--watch-model", default=None, help="registered model name")
    parser.add_argument("--watch-alias", action="append", default=[],
                        help=f"alias=served name (e.g. {CHAMPION}={CHAMPION}): hot-swap when the alias moves")
    parser.add_argument("--watch-interval-s", type=float, default=5.0)
    parser.add_argument("--nice", type=int, default=0,
                        help="run at this lower CPU priority (0-19), in an autogroup of its own: for background "
                             "servers (the local judge) beside a production endpoint")
    ServerSettings.add_arguments(parser, defaults)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        defaults = ServerSettings.from_env()
    except ValueError as exc:
        raise SystemExit(f"genops endpoint: {exc}") from None
    cli = parser(defaults)
    args = cli.parse_args(argv)
    settings = ServerSettings.from_arguments(cli, args)
    if not 0 <= args.nice <= 19:
        cli.error("--nice must be between 0 and 19")
    adapters = _pairs(cli, "--adapter", args.adapter)
    versions = _pairs(cli, "--version", args.version)
    if args.nice:
        from genops_assets.lib.priority import lower_priority

        lower_priority(args.nice, new_session=True)

    import uvicorn

    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.app import create_app

    state_dir = Path(args.state_dir)
    token = (state_dir / "admin_token").read_text().strip()
    loaded = load_model(args.base_model, adapters, dtype=args.dtype)
    app = create_app(loaded, settings, state_dir, token, versions)
    watchers = []
    if args.watch_registry and args.watch_model:
        from genops_assets.serving.registry_watch import AliasWatcher, version_loader

        swap = app.state.swap_adapter
        app.state.chat.version_loader = version_loader(args.watch_registry, args.watch_model,
                                                       state_dir / "registry", swap)
        for item in args.watch_alias or [f"{CHAMPION}={CHAMPION}"]:
            alias, _, name = item.partition("=")
            watchers.append(AliasWatcher(args.watch_registry, args.watch_model, alias, name or alias,
                                         state_dir / "registry", swap,
                                         lambda n=name or alias: versions.get(n), args.watch_interval_s).start())
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        for w in watchers:
            w.stop()


if __name__ == "__main__":
    main()
