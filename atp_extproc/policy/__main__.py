"""`python -m atp_extproc.policy check|test ...` until cli.py has the subcommands."""

from __future__ import annotations

import argparse
import sys

from atp_extproc.policy import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atp_extproc.policy")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="lint policies (atp.yaml or policy files)")
    check.add_argument("paths", nargs="*")
    check.add_argument("--envoy", action="append", default=[],
                       help="an Envoy config to check for fail-open (repeatable)")
    check.add_argument("--redaction", action="store_true", default=None,
                       help="redaction is enabled (refuse fail-open even without policies)")
    test = sub.add_parser("test", help="run YAML policy cases")
    test.add_argument("directory")
    args = parser.parse_args(argv)
    if args.command == "check":
        return cli.check(args.paths, args.envoy, redaction_enabled=args.redaction)
    return cli.test(args.directory)


if __name__ == "__main__":
    sys.exit(main())
