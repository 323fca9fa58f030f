"""`genops raters add|list|disable`: the people who may sign in to the rating UI."""

from __future__ import annotations

import argparse
import sys

from genops_assets.lib.ratings import RaterExists, RatingStore, store_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("raters", help="raters of the rating UI: add (prints the token once), list, disable")
    rsub = r.add_subparsers(dest="raters_cmd", required=True)
    a = rsub.add_parser("add", help="create a rater and print their token (shown once, stored hashed)")
    a.add_argument("name")
    a.add_argument("--rotate", action="store_true", help="issue a new token to an existing rater")
    rsub.add_parser("list", help="raters, whether disabled, and how many ratings each gave")
    d = rsub.add_parser("disable", help="refuse a rater's token from now on (their ratings stay)")
    d.add_argument("name")


def raters_command(args: argparse.Namespace) -> int:
    from resources.settings import GenopsSettings

    store = RatingStore(store_path(GenopsSettings.from_env().home.resolve()))
    try:
        if args.raters_cmd == "add":
            token = store.add_rater(args.name, rotate=args.rotate)
            print(f"rater '{args.name}': token (shown once; give it to the rater, it cannot be shown again):")
            print(token)
        elif args.raters_cmd == "disable":
            store.disable_rater(args.name)
            print(f"rater '{args.name}' disabled")
        else:
            raters = store.list_raters()
            for r in raters:
                print(f"{r['name']:<24} {'disabled' if r['disabled'] else 'active':<9} {r['ratings']:>6} ratings  "
                      f"since {r['created_at']}")
            if not raters:
                print(f"no raters yet in {store.path}: `genops raters add NAME`")
    except (RaterExists, ValueError) as exc:
        print(f"genops raters: {exc}", file=sys.stderr)
        return 2
    return 0
