"""The functions behind `atp-extproc check` (policy part) and `atp-extproc policy test`.

Both print to stdout and return the process exit code; cli.py wires the subcommands.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from pydantic import ValidationError

from atp_extproc.config import Server
from atp_extproc.policy import envoy_lint, testing
from atp_extproc.policy.engine import PolicySet
from atp_extproc.policy.runtime import data_classes_of, known_values, unknown_classes_alone
from atp_extproc.policy.settings import (
    Problem,
    included_file_problems,
    is_policy_file,
    load_file,
)
from atp_extproc.redact import RedactionSettings

ENFORCING = ("deny", "restrict", "redact", "tools")


def redaction_configured(raw: dict[str, Any]) -> bool:
    """Whether the config `raw` turns redaction on, as config.load would.

    A policy file says nothing about redaction. In an atp.yaml a missing `redaction:`
    section means the settings model's defaults, and redaction is on unless the section
    turns it off.
    """
    if is_policy_file(raw):
        return False
    section = raw.get("redaction")
    if not isinstance(section, dict) or "enabled" not in section:
        # Absent, or malformed (config.load reports that): the model's default.
        return RedactionSettings.model_fields["enabled"].default
    try:
        return RedactionSettings.model_validate({"enabled": section["enabled"]}).enabled
    except ValidationError:
        return True  # config.load refuses it; fail closed here


def _max_body_of(raw: dict) -> int:
    """atp.yaml's server.max_body_bytes (its default where unset or unreadable: config.load
    reports a bad value)."""
    default: int = Server.model_fields["max_body_bytes"].default
    server = raw.get("server")
    value = server.get("max_body_bytes", default) if isinstance(server, dict) else default
    try:  # as the config reads it
        return Server.model_validate({"max_body_bytes": value}).max_body_bytes
    except ValidationError:
        return default


def _mirrored_routes(raw: Any) -> list[str]:
    """The names of atp.yaml's routes whose objective mirrors traffic to a challenger."""
    routes = raw.get("routes") if isinstance(raw, dict) else None
    return [str(r.get("name")) for r in routes if isinstance(r, dict)
            and isinstance(r.get("objective"), dict)
            and isinstance(r["objective"].get("shadow"), dict)
            and r["objective"]["shadow"].get("mode") == "mirror"] \
        if isinstance(routes, list) else []


def check(paths: Sequence[str], envoy_configs: Sequence[str] = (), *,
          redaction_enabled: bool | None = None, out: TextIO | None = None,
          known_data_classes: Sequence[str] | None = None, verdict: bool = True,
          jwt: tuple[str, str] | None = None) -> int:
    """Lint atp.yaml files (or policy files): print `file:line: reason`; 1 on any error.

    verdict=False prints the problems only, without the OK lines and the tally: for a
    caller that found the files invalid otherwise and reports that itself.

    Also refuses each Envoy config in `envoy_configs` whose ext_proc fails open while the
    policies hold deny/restrict/redact/tools effects, default deny, or redaction is on
    (`redaction_enabled`, or detected from atp.yaml when None), and, given `jwt`
    (auth.jwt's metadata namespace and payload key), each whose jwt_authn claims would
    not reach ATP.
    """
    out = out or sys.stdout
    problems: list[Problem] = []
    why: list[str] = []
    summaries: list[str] = []
    clusters: set[str] | None = None
    max_body: int | None = None
    mirrored: list[str] = []  # atp.yaml's routes whose shadow mode is mirror
    for path in paths:
        loaded = load_file(path)
        problems += loaded.problems
        mirrored += _mirrored_routes(loaded.raw)
        if is_policy_file(loaded.raw):
            problems += included_file_problems(path)
        models = loaded.raw.get("models") if isinstance(loaded.raw, dict) else None
        if isinstance(models, list):
            clusters = (clusters or set()) | {str(m.get("cluster")) for m in models
                                              if isinstance(m, dict)}
            max_body = max(max_body or 0, _max_body_of(loaded.raw))
        # Entries that failed validation are already reported; lint the others too.
        policy_set, found = PolicySet.lint(
            loaded.policies, loaded.settings, path, known_values=known_values(loaded.raw),
            known_data_classes=known_data_classes if known_data_classes is not None
            else data_classes_of(loaded.raw))
        problems += found
        if known_data_classes is None and data_classes_of(loaded.raw) is None:
            problems += unknown_classes_alone(loaded.policies)
        effects = sorted({p.spec.effect for p in loaded.policies})
        enforcing = [e for e in effects if e in ENFORCING]
        if enforcing:
            why.append(f"{path} has {'/'.join(enforcing)} policies")
        if loaded.settings.default == "deny":
            why.append(f"{path} sets policy.default: deny")
        redaction = redaction_enabled if redaction_enabled is not None else \
            redaction_configured(loaded.raw)
        if redaction:
            why.append("redaction is enabled")
        if policy_set is not None and not loaded.problems:
            counts = {e: sum(1 for p in policy_set.policies if p.effect == e) for e in effects}
            summaries.append(f"{path}: {len(policy_set.policies)} policies ("
                             + ", ".join(f"{n} {e}" for e, n in counts.items()) + ")"
                             + f", mode {loaded.settings.mode}, default "
                             f"{loaded.settings.default}, {len(loaded.files)} file(s)")
    if not paths and redaction_enabled:
        why.append("redaction is enabled")
    for envoy in envoy_configs:
        problems += envoy_lint.check_file(envoy, sorted(set(why)), jwt, clusters, max_body,
                                          mirrored)
    problems.sort(key=lambda p: (p.file, p.line, p.severity != "error"))
    for problem in problems:
        print(problem, file=out)
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    if not verdict:
        return 1 if errors else 0
    if not errors:
        for line in summaries:
            print(f"{line}: OK", file=out)
    print(f"{errors} error(s), {warnings} warning(s)", file=out)
    return 1 if errors else 0


def test(directory: str, *, out: TextIO | None = None) -> int:
    """Run the YAML policy cases under `directory`; 0 only if every case passed."""
    out = out or sys.stdout
    report = testing.run(directory)
    testing.print_report(report, out)
    if report.load_errors:
        return 2
    if not report.passed and not report.failed:
        print(f"no policy cases found under {directory}", file=out)
        return 2
    return 0 if report.ok else 1
