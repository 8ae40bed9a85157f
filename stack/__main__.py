"""`python -m stack up|down|stop|start|demo|token|authority`: the local stack, the demo scenario and its tokens."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stack import local, tokens
from stack.auth import CUSTOMER, ROLES

ROOT = Path(__file__).resolve().parent.parent / ".stack"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path, default=ROOT, help="where state, data, logs and keys go")
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("up", "start the local stack in the background"), ("demo", "up, the scenario, down")):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("--history", type=int, default=2, help="number of history processes")
    commands.add_parser("down", parents=[common], help="stop the local stack and remove its data")
    for name, text in (
        ("stop", "stop one process of the running stack (SIGTERM), e.g. the replicator"),
        ("start", "start a stopped process of the stack again, and wait until it is ready"),
    ):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument(
            "process", help="approval, replicator, history-1, history-2, ..., prometheus (STACK_PROMETHEUS=1)"
        )
    token = commands.add_parser(
        "token",
        parents=[common],
        help="print a bearer token that the local stack accepts",
        description="Prints a token signed by the local stack's authority (created under ROOT/auth "
        "on first use). Pass it as the metadata `authorization: Bearer <token>`.",
    )
    token.add_argument(
        "--role", action="append", required=True, choices=ROLES, help="a role of the token (repeatable)"
    )
    token.add_argument(
        "--account",
        action="append",
        default=[],
        metavar="ID",
        help="an account the token acts for (repeatable); a customer may use only these",
    )
    token.add_argument(
        "--subject", help="who the token names (default: the role's identity in stack/tokens.py)"
    )
    token.add_argument("--lifetime", type=float, default=3600, metavar="SECONDS", help="default: 3600")
    commands.add_parser(
        "authority",
        parents=[common],
        help="print where the local authority's JWKS and policies are (creating them on first use)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "up":
        try:
            local.up(args.root, history_count=args.history)
        except Exception as error:
            print(f"make up failed: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "down":
        local.down(args.root)
        return 0
    if args.command in ("stop", "start"):
        try:
            if args.command == "stop":
                local.stop_process(args.root, args.process)
            else:
                local.start_process(args.root, args.process)
        except LookupError as error:
            print(error.args[0], file=sys.stderr)
            return 2
        except RuntimeError as error:
            print(f"{args.command} {args.process} failed: {error}", file=sys.stderr)
            return 1
        print(f"{args.process} {'stopped' if args.command == 'stop' else 'started'}")
        return 0
    if args.command == "token":
        if CUSTOMER in args.role and not args.account:
            print("a customer's token acts for its accounts: add --account ID", file=sys.stderr)
            return 2
        if args.lifetime <= 0:
            print("--lifetime must be positive", file=sys.stderr)
            return 2
        issuer = tokens.authority(args.root)
        print(tokens.token_for(issuer, args.role, args.account, args.subject, args.lifetime))
        return 0
    if args.command == "authority":
        issuer = tokens.authority(args.root)
        print(f"AUTH_ISSUER={issuer.ISSUER}")
        print(f"AUTH_AUDIENCE={issuer.AUDIENCE}")
        print(f"AUTH_JWKS_FILE={issuer.jwks_path}")
        print(f"APPROVAL_AUTH_POLICY_FILE={issuer.policy_path('APPROVAL_')}")
        print(f"HISTORY_AUTH_POLICY_FILE={issuer.policy_path('HISTORY_')}")
        return 0
    from stack.demo import run  # imports the generated stubs only when needed

    return run(args.root, history_count=args.history)


if __name__ == "__main__":
    sys.exit(main())
