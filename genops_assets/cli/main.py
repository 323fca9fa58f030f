"""`genops` command line: prepare the data directory, run the demo loop, open the UIs, manage
prompts and the endpoint."""

from __future__ import annotations

import argparse
import sys

from genops_assets.cli import raters, safety
from genops_assets.cli.home import init_home


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genops", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init-home", help="create the data directory and Dagster home")
    d = sub.add_parser("demo", help="run the whole loop on the embedded defaults")
    d.add_argument("--job", default="genops_loop", help="a job of the task (genops_loop, prompt_enhancement, ...)")
    d.add_argument("--task", default=None, help="the task folder (default: GENOPS_TASK, support_triage)")
    sub.add_parser("ui", help="Dagster UI on :3000 and MLflow UI on :5000")
    sub.add_parser("stop", help="stop the local endpoint and judge servers")
    sv = sub.add_parser("serve", help="the OpenAI-compatible server in the foreground (containers)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8008)
    rb = sub.add_parser("rollback", help="move the champion alias back (the endpoint follows)")
    rb.add_argument("--task", default=None)
    rb.add_argument("--version", default=None, help="default: the previous champion")
    au = sub.add_parser("audit", help="the audit log of deploys, promotions and rollbacks (newest first)")
    au.add_argument("--model", default=None, help="a registered model name (default: every model)")
    au.add_argument("--limit", type=int, default=50)
    op = sub.add_parser("optimize", help="a task's optimization job (variants, their table, deploy); prints the table")
    op.add_argument("--task", default=None, help="the task folder (default: GENOPS_TASK, support_triage)")
    op.add_argument("--config", default=None, help="a run config (YAML) with bare step names, e.g. optimization_report")
    sub.add_parser("enhance", help="LLM prompt enhancement, then the eval report with the prompt comparison")
    pr = sub.add_parser("prompt", help="prompt registry: try, list, alias, promote, rollback")
    psub = pr.add_subparsers(dest="prompt_cmd", required=True)
    t = psub.add_parser("try", help="outputs and metrics of a prompt file on a validation sample")
    t.add_argument("--task", default=None)
    t.add_argument("--prompt", required=True, help="a .txt (system instructions) or .yaml (system/user/generation)")
    t.add_argument("--model", default="base", help="base, an alias (champion, challenger) or a version number")
    t.add_argument("-n", type=int, default=20)
    t.add_argument("--base-model", default=None, help="a local Hugging Face folder instead of the embedded model")
    for cmd in ("list", "promote", "rollback"):
        psub.add_parser(cmd).add_argument("--task", default=None)
    a = psub.add_parser("alias", help="point an alias at a version (rollback = move production back)")
    a.add_argument("alias")
    a.add_argument("version", type=int)
    a.add_argument("--task", default=None)
    raters.add_parser(sub)
    safety.add_parser(sub)
    k = sub.add_parser("keys", help="endpoint API keys: new (a key, shown once, and the digest to configure)")
    k.add_argument("keys_cmd", choices=["new"])
    g = sub.add_parser("golden", help="golden proposals: list, accept one into the task's golden set")
    gsub = g.add_subparsers(dest="golden_cmd", required=True)
    gsub.add_parser("list").add_argument("--task", default=None)
    ga = gsub.add_parser("accept", help="append a proposal to tasks/<task>/golden_additions.jsonl")
    ga.add_argument("proposal_id")
    ga.add_argument("--task", default=None)
    return p


def new_key_text() -> str:
    """A new endpoint key, printed once, and the digest the endpoint stores instead of it."""
    import secrets

    from genops_assets.serving.protection import key_digest

    key = "gk-" + secrets.token_urlsafe(32)
    return (f"key (shown once; give it to the client, store it nowhere else): {key}\n"
            f"endpoint entry for GENOPS_API_KEYS (comma-separated with others): {key_digest(key)}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "init-home":
        print(init_home())
        return 0
    if args.cmd == "demo":
        from genops_assets.cli import demo

        # The demo's run config sizes the loop it was written for; another job runs as configured.
        return demo.demo(args.job, demo.DEMO_RUN_CONFIG if args.job.endswith("genops_loop") else None, args.task)
    if args.cmd == "optimize":
        from genops_assets.cli.optimize import optimize

        return optimize(args.task, args.config)
    if args.cmd == "enhance":
        from genops_assets.cli.demo import enhance

        return enhance()
    if args.cmd == "prompt":
        from genops_assets.cli.prompt import prompt_command

        return prompt_command(args)
    if args.cmd == "keys":
        print(new_key_text())
        return 0
    if args.cmd == "raters":
        return raters.raters_command(args)
    if args.cmd == "safety":
        return safety.safety_command(args)
    if args.cmd == "golden":
        from genops_assets.cli.golden import golden_command

        return golden_command(args)
    if args.cmd == "ui":
        from genops_assets.cli.ui import ui

        return ui()
    from genops_assets.cli import endpoint

    if args.cmd == "serve":
        return endpoint.serve(args.host, args.port)
    if args.cmd == "rollback":
        return endpoint.model_rollback(args.task, args.version)
    if args.cmd == "audit":
        return endpoint.audit(args.model, args.limit)
    return endpoint.stop()


if __name__ == "__main__":
    sys.exit(main())
