"""The endpoint process: ``python -m genops_assets.serving.cli --base-model DIR --state-dir DIR``.

One process serves every task: ``--adapter support_triage=DIR --version support_triage=3`` serves
a task's champion, ``--adapter support_triage:challenger=DIR`` its challenger. With
``--watch-registry`` it follows the `champion` alias of every registered model named
``<watch prefix><task>`` and loads ``<task>:v<N>`` from that registry when asked.

Started and stopped by ``genops_assets.serving.control``. What the model serves and where the
process keeps its state are options here; how it serves (batching, limits, canary share,
sampling) are the ``ServerSettings``, each an option with a ``GENOPS_*`` environment default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genops_assets.serving.protocol import CHAMPION, ROLES
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
    parser.add_argument("--adapter", action="append", default=[],
                        help="model=folder, the model a task's served name (support_triage, support_triage:challenger)")
    parser.add_argument("--version", action="append", default=[], help="model=registry version")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8008)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--watch-registry", default=None, help="MLflow tracking URI whose aliases to follow")
    parser.add_argument("--watch-prefix", default="genops-",
                        help="registered models named <prefix><task> hold each task's versions")
    parser.add_argument("--watch-alias", action="append", default=[], choices=ROLES,
                        help=f"the alias followed in every task's model (default {CHAMPION}): hot-swap when it moves")
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

    from genops_assets.lib.quantization import QuantizationUnavailable
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.app import create_app
    from genops_assets.serving.protocol import BASE_NAME, ModelName, ModelNameError

    state_dir = Path(args.state_dir)
    token = (state_dir / "admin_token").read_text().strip()
    try:
        names = {ModelName.parse(name).served: folder for name, folder in adapters.items()}
        versions = {ModelName.parse(name).served: version for name, version in versions.items()}
    except ModelNameError as exc:
        cli.error(f"--adapter/--version: {exc}")
    if any(ModelName.parse(n).task is None for n in names):
        cli.error(f"--adapter: '{BASE_NAME}' is the base model, not an adapter")
    try:
        loaded = load_model(args.base_model, names, dtype=args.dtype, quantization=settings.quantization)
    except QuantizationUnavailable as exc:
        raise SystemExit(f"genops endpoint: {exc}") from None
    app = create_app(loaded, settings, state_dir, token, versions)
    watcher = None
    if args.watch_registry:
        from genops_assets.serving.registry_watch import RegistryWatcher, version_loader

        chat = app.state.chat
        chat.version_loader = version_loader(args.watch_registry, args.watch_prefix, state_dir / "registry",
                                             chat.swap_adapter)
        watcher = RegistryWatcher(args.watch_registry, args.watch_prefix, state_dir / "registry", chat.swap_adapter,
                                  chat.adapter_version, tuple(args.watch_alias or [CHAMPION]), args.watch_interval_s,
                                  skip=chat.router.removed).start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if watcher is not None:
            watcher.stop()


if __name__ == "__main__":
    main()
