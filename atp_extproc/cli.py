"""atp-extproc: serve | check | policy test | report savings | stack | demo-upstream."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import os
import re
import signal
import sys
import time
from collections.abc import Collection, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atp_extproc.config import ConfigError

# asyncio, config (pydantic, CEL, RE2) and the server (gRPC) are imported where used:
# they take from tens of ms to the better part of a second, and `serve` must hold its
# signals before that.


class _EarlySignals:
    """`serve`'s signals until the server's loop installs its own handlers: an early stop
    signal is remembered, and honoured as a clean drain once the loop can (not a death by
    signal, nor a KeyboardInterrupt traceback); SIGHUP, a reload, is ignored, since the
    config is read after it anyway, and must never end ATP."""

    def __init__(self) -> None:
        self.stop_requested = False
        self._previous = {signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_IGN),
                          signal.SIGTERM: signal.signal(signal.SIGTERM, self._remember),
                          signal.SIGINT: signal.signal(signal.SIGINT, self._remember)}

    def _remember(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def restore(self) -> None:
        """The handlers from before `serve`: an ignored SIGHUP left behind would pass to
        every process the caller starts later (`serve` run in process, as tests do)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _serve(args: argparse.Namespace) -> int:
    """Exit 0 after a drain, 2 for a config or --listen that is invalid, 1 when ATP cannot
    start where asked (address in use, ledger not writable): one line on stderr."""
    early = _EarlySignals()
    try:
        return _serve_with(args, early)
    finally:
        # Called by code that goes on: its own handlers again. As the program, serve's
        # stay (a late signal ignored) until it exits: put back, a SIGHUP in its last
        # milliseconds ended ATP.
        if args.in_process:
            early.restore()


def _serve_with(args: argparse.Namespace, early: _EarlySignals) -> int:
    from atp_extproc import config as config_mod
    from atp_extproc import logs, server
    from atp_extproc.store.ledger import LedgerUnavailable

    try:
        snapshot = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"atp-extproc: invalid config, not starting:\n{exc}", file=sys.stderr)
        return 2
    try:
        _check_listen_option(args.listen)
    except _UnusableInput as exc:
        print(f"atp-extproc: {exc}", file=sys.stderr)
        return 2
    logs.setup(args.log_level or snapshot.server.log_level)
    options = server.ServeOptions(listen=args.listen, log_level=args.log_level)
    try:
        return _run(server.serve(Path(args.config), options,
                                 lambda: early.stop_requested))
    except config_mod.ConfigError as exc:
        # serve reads the file again (stamped first, for the reload watch): an edit
        # made meanwhile can leave it invalid.
        logs.flush()
        print(f"atp-extproc: invalid config, not starting:\n{exc}", file=sys.stderr)
        return 2
    except (server.StartupError, LedgerUnavailable) as exc:
        logs.flush()
        print(f"atp-extproc: not starting: {exc}", file=sys.stderr)
        return 1


def _check_listen_option(listen: str | None) -> None:
    """--listen, checked as server.listen is."""
    from pydantic import ValidationError

    from atp_extproc.config import Server

    if listen is None:
        return
    try:
        Server(listen=listen)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise _UnusableInput(f"--listen {reason}") from None


def _run(main: Coroutine[Any, Any, int]) -> int:
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return int(uvloop.run(main))


def _check(args: argparse.Namespace) -> int:
    from atp_extproc import config as config_mod
    from atp_extproc.policy import cli as policy_cli

    doc, unreadable = _read_mapping(args.config)
    if unreadable:
        print("\n".join(unreadable))
        print(f"{len(unreadable)} error(s), 0 warning(s)")
        return 1
    if doc and policy_cli.is_policy_file(doc):
        # One team's file on its own: its policies, without an atp.yaml's models.
        return policy_cli.check([args.config], args.envoy)
    try:
        snapshot = config_mod.load(args.config)
        config_mod.check_paths(snapshot)
    except config_mod.ConfigError as exc:
        # The policy report names file:line for every problem it knows; the config's own
        # problems follow, less those the report already gave.
        report = io.StringIO()
        policy_cli.check([args.config], args.envoy, verdict=False, out=report)
        lines = report.getvalue().splitlines()
        lines += [line for line in _config_problem_lines(exc, lines) if line not in lines]
        warnings = sum(1 for line in lines if _WARNING.match(line))
        print("\n".join(lines))
        print(f"{len(lines) - warnings} error(s), {warnings} warning(s)")
        return 1
    # Policies first: their report names file:line for every problem, warnings included.
    jwt = snapshot.auth.jwt
    code = policy_cli.check([args.config], args.envoy, jwt=(
        (jwt.metadata_namespace, jwt.payload_key) if jwt is not None else None))
    if code == 0:  # an Envoy config that fails open (or cannot be read) is not OK
        print(f"{args.config}: OK (version {snapshot.version}, {len(snapshot.models)} "
              f"models, {len(snapshot.routes)} routes, "
              f"{len(snapshot.policies.policies) if snapshot.policies else 0} policies)")
    return code


def _read_mapping(path: str) -> tuple[Any, list[str]]:
    """The file's YAML mapping, and why it is none one can read, each problem once: it
    cannot be read, it is not YAML, not a mapping, or a key is given twice (named by its
    full path)."""
    from atp_extproc.config import ConfigError, key_path, read_config_text
    from atp_extproc.policy.settings import load_yaml

    try:
        text = read_config_text(path)
    except ConfigError as exc:
        return None, [f"{path}: {reason}" for _, reason in exc.problems]
    doc, problems = load_yaml(text, path)
    if not problems and not isinstance(doc, dict):
        return doc, [f"{path}: the file must hold a mapping (server:, models:, routes:, ...)"]
    # load_yaml names a key given twice by the key alone.
    return doc, [str(dataclasses.replace(p, path=key_path(doc, p.line, p.path) or p.path))
                 if p.path else str(p) for p in problems]


# A warning line of the policy report (policy.settings.Problem).
_WARNING = re.compile(r"[^:]+(?::\d+)?: warning: ")
# config.ConfigError's path for a problem in an included policy file: "other.yaml:N: path".
_LINE_IN_OTHER_FILE = re.compile(r".+?:\d+(?:: |$)")


def _config_problem_lines(exc: ConfigError, report: Collection[str]) -> list[str]:
    """A ConfigError's problems as the policy report writes them: file:line: path: reason
    where the line is known, else file: path: reason. A problem of another file with no
    line is written as that file's own, `other.yaml: reason`, as `report` (the policy
    report's lines) has it."""
    lines = []
    for (path, reason), line in zip(exc.problems, exc.lines, strict=True):
        if line:
            where = f"{exc.file}:{line}" + (f": {path}" if path else "")
        elif _LINE_IN_OTHER_FILE.match(path) or f"{path}: {reason}" in report:
            # Another file's problem ("other.yaml:N"). With no line its path is the file's
            # name alone, which only the report tells from a key's.
            where = path
        else:
            where = f"{exc.file}: {path or '<root>'}"
        lines.append(f"{where}: {reason}")
    return lines


def _policy_test(args: argparse.Namespace) -> int:
    from atp_extproc.policy import cli as policy_cli

    return policy_cli.test(args.directory)


class _StopSignal(BaseException):
    # BaseException, as KeyboardInterrupt: the readiness checks suppress Exception, and a
    # stop during start-up must not be swallowed by one.
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stack_port(text: str) -> tuple[str, int]:
    name, _, port = text.partition("=")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PORT, PORT 1-65535")
    return name, int(port)


def _stack(args: argparse.Namespace) -> int:
    """Run the stack until a signal or a child's exit; stop every child either way.

    Exit 0 after a stop signal (Ctrl-C, SIGTERM, SIGHUP when the terminal goes), 1 when a
    child failed to start or exited on its own (named on stderr), 2 when a port is taken
    or --port names no listener or puts two on one port.
    """
    from atp_extproc.stack import PortBusyError, Stack

    workdir = Path(args.workdir)
    try:
        stack = Stack.on_default_ports(Path(args.config), workdir, args.port)
    except ValueError as exc:
        print(f"atp-extproc stack: {exc}", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)

    def _on_signal(signum, frame) -> None:
        raise _StopSignal(signum)

    # A signal already ignored stays ignored: `nohup make run` must outlive its terminal.
    previous = {sig: signal.signal(sig, _on_signal) for sig in _STOP_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN}
    code = 0
    try:
        stack.start_all()
        print(f"ATP stack is up (logs in {workdir}):")
        urls = list(stack.urls())
        width = max(len(what) for what, _ in urls)
        for what, where in urls:
            print(f"  {what:{width}}  {where}")
        print(f"Try:\n  curl -s http://127.0.0.1:{stack.ports['envoy']}/v1/models "
              "-H 'Authorization: Bearer sk-demo-alice'\nCtrl-C stops everything.")
        sys.stdout.flush()
        while not (exited := stack.exited()):
            time.sleep(0.5)
        for name, returncode in exited:
            print(f"atp-extproc stack: {name} exited unexpectedly (exit code {returncode}); "
                  f"see {workdir / (name + '.log')}. Stopping the rest.", file=sys.stderr)
        code = 1
    except _StopSignal:
        pass  # stopped as asked: exit 0
    except PortBusyError as exc:
        print(f"atp-extproc stack: not starting: {exc}", file=sys.stderr)
        code = 2
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"atp-extproc stack: failed to start: {exc}; logs in {workdir}", file=sys.stderr)
        # Why a child stopped is the end of its log (ATP's one line for a bad config):
        # shown here, not left for the user to find.
        for name, _ in stack.exited():
            for line in stack.log(name, this_run=True).splitlines()[-5:]:
                print(f"  {name}: {line}", file=sys.stderr)
        code = 1
    finally:
        # No second signal may cut the cleanup short: one that comes while the handlers
        # are being set aside raises here, and they are set aside again.
        while True:
            try:
                for sig in previous:
                    signal.signal(sig, signal.SIG_IGN)
                break
            except _StopSignal:
                continue
        try:
            stack.stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code


class _UnusableInput(Exception):
    """An argument or file a command cannot use; the message says which and why."""


def _report_savings(args: argparse.Namespace) -> int:
    """Print the savings table. Exit 1 when there is no ledger (yet), 2 with one line on
    stderr when an argument, the config or the ledger file cannot be used."""
    try:
        db_path, by, since = _savings_inputs(args)
        if not Path(db_path).exists():
            print(f"atp-extproc: no ledger at {db_path}", file=sys.stderr)
            return 1
        print(_savings_table(db_path, by, args.bucket, since))
    except _UnusableInput as exc:
        print(f"atp-extproc: {exc}", file=sys.stderr)
        return 2
    return 0


def _savings_inputs(args: argparse.Namespace) -> tuple[str, tuple[str, ...], int | None]:
    """The ledger path, the --by columns and --since as a timestamp."""
    from atp_extproc import config as config_mod
    from atp_extproc.routing.report import parse_since
    from atp_extproc.store.sqlite import GROUP_COLUMNS

    by = tuple(args.by.split(","))
    unknown = [column for column in by if column not in GROUP_COLUMNS]
    if unknown:
        raise _UnusableInput(f"--by: cannot group by {unknown[0]!r}; choose from "
                             f"{', '.join(GROUP_COLUMNS)}")
    twice = [column for i, column in enumerate(by) if column in by[:i]]
    if twice:
        raise _UnusableInput(f"--by: {twice[0]!r} is given twice")
    try:
        since = None if args.since is None else parse_since(args.since)
    except ValueError:
        raise _UnusableInput(f"--since {args.since!r}: give 24h, 7d, 90m or an ISO "
                             "date") from None
    if args.db is not None:
        return args.db, by, since
    try:
        # Only the ledger's path is read: no secret (the redaction key) is needed for it.
        ledger = config_mod.load(args.config, secrets=False).ledger
    except config_mod.ConfigError as exc:
        raise _UnusableInput(f"no ledger path (give --db, or a valid --config): {exc}") \
            from None
    if not ledger.enabled:
        # Its ledger.path would name a file ATP never writes with this config.
        raise _UnusableInput(f"{args.config} has ledger.enabled: false, so ATP keeps no "
                             "ledger with it (give --db FILE to read one)")
    return ledger.path, by, since


def _savings_table(db_path: str, by: tuple[str, ...], bucket: str, since: int | None) -> str:
    import sqlite3

    from atp_extproc.routing.report import savings_report

    if Path(db_path).is_dir():
        raise _UnusableInput(f"{db_path} is a directory, not a ledger file")
    if not Path(db_path).is_file():
        # SQLite would wait on a pipe for ever.
        raise _UnusableInput(f"{db_path} is not a regular file (a device or a pipe), "
                             "not a ledger file")
    try:
        return savings_report(db_path, by=by, bucket=bucket, since=since)
    except sqlite3.Error as exc:
        raise _UnusableInput(f"{db_path} is not a readable ledger: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atp-extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_proc gRPC server")
    serve.add_argument("--config", required=True, help="path to atp.yaml")
    serve.add_argument("--listen", help="override server.listen (host:port or unix:/path)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="override server.log_level (a reload then keeps this one)")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check", help="validate an atp.yaml and the policies it "
                                          "includes, or one policy file")
    check.add_argument("config", help="an atp.yaml, or a file holding only a policies: "
                                       "list")
    check.add_argument("--envoy", action="append", default=[], metavar="ENVOY_YAML",
                       help="also refuse this Envoy config if it fails open where policies "
                            "or redaction apply (repeatable)")
    check.set_defaults(func=_check)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy", required=True)
    ptest = policy_sub.add_parser("test", help="run YAML policy test cases in a directory")
    ptest.add_argument("directory")
    ptest.set_defaults(func=_policy_test)

    # demo-upstream parses its own options (see atp_extproc.demo_upstream).
    sub.add_parser("demo-upstream", help="run a fake OpenAI-compatible upstream",
                   add_help=False)

    stack = sub.add_parser("stack", help="run Envoy + ATP + demo upstreams (make run)")
    stack.add_argument("--config", default="examples/atp.yaml", help="ATP's atp.yaml")
    stack.add_argument("--workdir", default=".run",
                       help="where the rendered Envoy config and the logs go")
    stack.add_argument("--port", action="append", default=[], type=_stack_port,
                       metavar="NAME=PORT",
                       help="listen elsewhere than the default (repeatable; NAME: envoy, "
                            "admin, atp, demo_a or demo_b): make run PORTS='envoy=10001'")
    stack.set_defaults(func=_stack)

    report = sub.add_parser("report", help="reports from the durable ledger")
    report_sub = report.add_subparsers(dest="report", required=True)
    savings = report_sub.add_parser("savings", help="spend and savings against the baseline")
    savings.add_argument("--config", default="examples/atp.yaml",
                         help="atp.yaml whose ledger.path to read")
    savings.add_argument("--db", help="ledger file (overrides --config)")
    savings.add_argument("--by", default="tenant,route",
                         help="comma-separated: tenant, route, model")
    savings.add_argument("--bucket", choices=["hour", "day", "total"], default="hour")
    savings.add_argument("--since", help="24h, 7d, 90m or an ISO date")
    savings.set_defaults(func=_report_savings)

    in_process = argv is not None  # called by code that goes on, not as the program
    argv = sys.argv[1:] if argv is None else argv
    # Before parsing: argparse would refuse demo-upstream's own options.
    if argv[:1] == ["demo-upstream"]:
        from atp_extproc import demo_upstream

        return demo_upstream.main(argv[1:])
    args = parser.parse_args(argv)
    args.in_process = in_process
    try:
        code = int(args.func(args))
        if sys.stdout is not None:  # None when started with stdout closed (`>&-`)
            sys.stdout.flush()  # here, where a reader gone is caught, not at exit
        return code
    except BrokenPipeError:
        # The reader left (`check ... | head`): no traceback, and no second error when
        # Python flushes stdout at exit (the way the Python docs give).
        _silence_stdout()
        return 1
    except OSError as exc:
        # One line, not a traceback: output that cannot be written (a full disk,
        # `> /dev/full`), or a file a command could not read or make that it did not
        # name itself (a directory not ours to search, a workdir that is a file).
        if exc.filename is not None:
            print(f"atp-extproc: {exc.strerror}: {exc.filename}", file=sys.stderr)
            return 1
        if exc.errno not in _WRITE_ERRNOS:
            raise
        _silence_stdout()
        print(f"atp-extproc: cannot write the output: {exc.strerror}", file=sys.stderr)
        return 1


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _silence_stdout() -> None:
    """Send what is still buffered for stdout nowhere, so the flush at exit raises no
    second error."""
    if sys.stdout is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
