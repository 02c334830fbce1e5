"""`atp-extproc policy test DIR`: a team's own policy cases, like `opa test`.

A case file (any *.yaml under DIR):

    policies: [../*.yaml]          # files or globs, relative to this file (an atp.yaml
                                   # with policy.include works too)
    models: ../../atp.yaml         # optional: where `candidates: [name]` are looked up
    settings: {default: deny}      # optional: replaces these fields of the policy:
                                   # section (not include)
    cases:
      - name: bob may not use gpt-4o
        subject: {tenant: bob, auth_method: api_key}
        request: {alias: gpt-4o, operation: chat}
        context: {environment: prod}
        candidates: [large]        # model names, or mappings of CandidateInfo fields
        expect:
          denied: models.premium_alias       # policy id, or false
          would_deny: false
          allowed_candidates: [large]
          required_redactions: []
          tools_denied: []
          tools_stripped: []
          decisions: {models.premium_alias: deny}

Every key of `expect` is optional; each one given is compared exactly. `denied` and
`would_deny` are serve's: a request whose tool_choice forces a tool a strip policy
removes, or is `required` with none left, is refused in that policy's name. context.time is
2026-01-01T12:00:00Z unless a case sets it, so results never depend on the clock;
context.environment is policy.environment (the suite's settings, else its atp.yaml's), as
serve sets it, unless a case sets it. An atp.yaml with `routes:` is loaded as serve loads
it, so a config serve refuses fails here too. The report ends
with exact coverage counts: for each policy how many cases it was evaluated in, how many
times its condition matched, did not match, failed, or did not apply, and how many cases
asserted its decision; then per effect.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from atp_extproc import config
from atp_extproc.policy.attributes import AttributeError_, CandidateInfo, build_attributes
from atp_extproc.policy.engine import Outcome, PolicySet
from atp_extproc.policy.runtime import (
    claimed_subject,
    data_classes_of,
    known_values,
    unknown_classes_alone,
)
from atp_extproc.policy.settings import (
    PolicyError,
    PolicySettings,
    Problem,
    SourcedPolicy,
    included_file_problems,
    is_policy_file,
    line_of,
    load_file,
    load_yaml,
    located,
)
from atp_extproc.settings_types import problem_reason

MATCHED = frozenset({"deny", "would_deny", "allow", "would_allow", "restrict",
                     "would_restrict", "redact", "would_redact", "strip", "would_strip"})
EXPECT_KEYS = frozenset({"denied", "would_deny", "allowed_candidates", "required_redactions",
                         "tools_denied", "tools_stripped", "decisions"})
CASE_KEYS = frozenset({"name", "subject", "request", "context", "candidates", "expect"})
FILE_KEYS = frozenset({"policies", "models", "settings", "cases"})
# What a case's keys, and its expect's, hold when given: build_attributes and _compare
# read them as such.
CASE_SHAPES: dict[str, type] = {"subject": Mapping, "request": Mapping, "context": Mapping,
                                "candidates": list, "expect": Mapping}
EXPECT_SHAPES: dict[str, type] = {"allowed_candidates": list, "required_redactions": list,
                                  "tools_denied": list, "tools_stripped": list,
                                  "decisions": Mapping}
# Cases must not depend on the clock: context.time is this unless a case sets it.
CASE_TIME = "2026-01-01T12:00:00Z"


@dataclass
class PolicyCoverage:
    effect: str
    evaluated: int = 0
    matched: int = 0
    not_matched: int = 0
    errors: int = 0
    not_applicable: int = 0
    asserted: int = 0


@dataclass
class Report:
    passed: int = 0
    failed: int = 0
    load_errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    coverage: dict[str, PolicyCoverage] = field(default_factory=dict)
    failures: list[tuple[str, str, list[str]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.load_errors and self.passed > 0


def _models(path: Path, case_file: Path) -> tuple[dict[str, CandidateInfo], dict[str, Any]]:
    """The candidates of the atp.yaml at `path` by name, and the file's sections."""
    file = str(path)
    doc, problems = load_yaml(path.read_text(encoding="utf-8"), file)
    if problems:
        raise PolicyError(problems)
    if doc is None:
        return {}, {}
    if not isinstance(doc, Mapping):
        raise PolicyError([Problem(file, getattr(doc, "line", 1), "",
                                   f"the `models:` of {case_file} is an atp.yaml: it must "
                                   "hold a mapping")])
    entries = doc.get("models") or []
    if not isinstance(entries, list):
        raise PolicyError([Problem(file, line_of(doc, ["models"]), "models",
                                   "must be a list")])
    out: dict[str, CandidateInfo] = {}
    for i, m in enumerate(entries):
        if isinstance(m, dict) and "name" in m:
            out[str(m["name"])] = _candidate(m, file, i)
    return out, dict(doc)


def _candidate(m: Mapping[str, Any], file: str, index: int) -> CandidateInfo:
    price = m.get("price") or {}
    where, line = f"models[{index}].price", line_of(m, ["price"])
    if not isinstance(price, Mapping):
        raise PolicyError([Problem(file, line, where, "must be a mapping")])
    try:
        per_1k = (float(price.get("input_per_1k", 0.0)), float(price.get("output_per_1k", 0.0)))
    except (TypeError, ValueError) as exc:
        raise PolicyError([Problem(file, line, where, str(exc))]) from None
    return CandidateInfo(
        model=str(m["name"]), provider=str(m.get("provider") or m.get("cluster", "")),
        region=str(m.get("region", "unspecified")), egress=str(m.get("egress", "external")),
        input_per_1k=per_1k[0], output_per_1k=per_1k[1], cluster=str(m.get("cluster", "")))


def _overrides(file: Path, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The `policy:` fields the case file's `settings:` sets; they are merged into each
    policy file's own, so an atp.yaml keeps its `include` (and what the case leaves out)."""
    raw = doc.get("settings")
    if not raw:
        return {}
    line = getattr(doc, "key_lines", {}).get("settings", 1)
    if not isinstance(raw, Mapping):
        raise PolicyError([Problem(str(file), line, "settings", "must be a mapping")])
    if "include" in raw:
        raise PolicyError([Problem(str(file), line, "settings.include",
                                   "list the policy files under `policies:`")])
    try:
        override = PolicySettings.model_validate(dict(raw))
    except ValidationError as exc:
        raise PolicyError([
            Problem(str(file), line, path, problem_reason(e)) for e in exc.errors()
            for path, line in [located(doc, ["settings", *e["loc"]])]]) from None
    return {name: getattr(override, name) for name in override.model_fields_set}


def _load_suite(file: Path, doc: Mapping[str, Any]
                ) -> tuple[PolicySet, dict[str, CandidateInfo], list[Problem]]:
    base = file.parent
    problems: list[Problem] = []
    sources = doc.get("policies")
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not sources:
        raise PolicyError([Problem(str(file), getattr(doc, "line", 1), "policies",
                                   "list the policy files (or atp.yaml) to test")])
    overrides = _overrides(file, doc)
    policies: list[SourcedPolicy] = []
    settings: PolicySettings | None = None
    raw: dict[str, Any] = {}
    served: dict[str, str] = {}  # atp.yaml files serve would run, by real path
    for i, pattern in enumerate(sources):
        line = line_of(doc, ["policies", i] if isinstance(doc.get("policies"), list)
                       else ["policies"])
        matches = sorted(glob.glob(str(base / str(pattern)), recursive=True))
        matches = [m for m in matches if Path(m).resolve() != file.resolve()]
        if not matches:
            problems.append(Problem(str(file), line, "policies",
                                    f"{pattern!r} matches no file"))
        case_files: list[str] = []
        for match in matches:
            loaded = load_file(match, overrides)
            # A glob beside the cases (`*.yaml`) also matches the other case files:
            # they hold cases, not policies, and are run on their own.
            if "cases" in loaded.raw:
                case_files.append(match)
                continue
            problems += [p for p in loaded.problems if p.severity == "error"]
            if is_policy_file(loaded.raw):
                problems += included_file_problems(match)
            policies += loaded.policies
            if _serves(loaded.raw):
                served.setdefault(os.path.realpath(match), match)
            # An atp.yaml's settings (default, mode) are what ATP runs with, wherever
            # it is listed; a policy file's are only defaults.
            if settings is None or (is_policy_file(raw) and not is_policy_file(loaded.raw)):
                settings, raw = loaded.settings, loaded.raw
        if case_files and len(case_files) == len(matches):
            problems.append(Problem(str(file), line, "policies",
                                    f"{pattern!r} matches case files only "
                                    f"({', '.join(case_files)}): name the policy files "
                                    "(or atp.yaml) the cases test"))
    models: dict[str, CandidateInfo] = {}
    models_raw: dict[str, Any] = {}
    if doc.get("models"):
        models_file = base / str(doc["models"])
        models, models_raw = _models(models_file, file)
        if (settings is None or is_policy_file(raw)) and "policy" in models_raw:
            # The atp.yaml the cases run against sets what serve runs with (environment,
            # default, mode), over the listed policy files' defaults.
            settings = load_file(models_file, overrides).settings
        raw = raw or models_raw
        if _serves(models_raw):
            served.setdefault(os.path.realpath(models_file), str(models_file))
    if problems:
        raise PolicyError(problems)
    # Checked against the classes serve would know, so a typo `serve` refuses fails here
    # too: the listed atp.yaml's, else the one `models:` names (the config the cases run
    # against). Policy files alone say nothing of custom detectors: warned of, as check
    # warns.
    classes = data_classes_of(raw or {})
    if classes is None and models_raw:
        classes = data_classes_of(models_raw)
    warnings = unknown_classes_alone(policies) if classes is None else []
    policy_set = PolicySet.compile(policies, settings or PolicySettings(**overrides),
                                   str(file), known_values=known_values(raw or {}),
                                   known_data_classes=classes)
    # After the policies' own problems, which name their file and line: serve's checks
    # of the whole file say the rest (a redact policy for a class redaction turns off).
    refusals = _serve_refusals(served.values())
    if refusals:
        raise PolicyError(refusals)
    return policy_set, models, warnings


def _serves(raw: Mapping[str, Any]) -> bool:
    """Whether a file the suite reads is an atp.yaml serve runs: one that routes, not the
    models (or redaction and policies) alone a suite may give its cases."""
    return "routes" in raw


def _serve_refusals(paths: Iterable[str]) -> list[Problem]:
    """Why serve would refuse each atp.yaml of `paths`, as its own loader says."""
    problems: list[Problem] = []
    for path in paths:
        try:
            # Without secrets: the redactor's HMAC key is the deployment's environment
            # variable, which the cases do not run in.
            config.load(path, secrets=False)
        except config.ConfigError as exc:
            problems += [Problem(exc.file, line, where, reason) for (where, reason), line
                         in zip(exc.problems, exc.lines, strict=True)]
    return problems


# What a candidate written as a mapping may give (CandidateInfo's own fields).
_CANDIDATE_KEYS = tuple(f.name for f in dataclasses.fields(CandidateInfo) if f.init)


def _candidates(value: Any, models: dict[str, CandidateInfo]) -> list[CandidateInfo]:
    out = []
    for item in value or ():
        if isinstance(item, str):
            if item not in models:
                raise AttributeError_(f"unknown model {item!r} in candidates (give `models:`"
                                      " an atp.yaml, or write the candidate as a mapping)")
            out.append(models[item])
        elif isinstance(item, Mapping):
            unknown = sorted(str(k) for k in item if k not in _CANDIDATE_KEYS)
            if unknown:
                raise AttributeError_(f"a candidate has no {unknown[0]!r}: it takes "
                                      f"{', '.join(_CANDIDATE_KEYS)} (resource."
                                      "estimated_cost_usd is worked out from the prices)")
            out.append(CandidateInfo(**dict(item)))
        else:
            raise AttributeError_("a candidate is a model name or a mapping")
    return out


# Words for "none" a case may give (YAML 1.2 reads no/off as words): no policy id is one,
# as ids are namespaced (`team.rule`).
_NONE_WORDS = frozenset(("none", "", "no", "off", "false", "n"))


def _id_or_false(value: Any) -> str | None:
    return None if value is None or value is False or (
        isinstance(value, str) and value.lower() in _NONE_WORDS) else str(value)


def _insisting(request: Any) -> Callable[[tuple[str, ...]], str | None]:
    """What serve refuses a request for when strip policies take away a tool it insists
    on, as far as the attributes tell: request.tool_choice forcing one of them, or
    `required` with every declared tool stripped."""
    choice = request.tool_choice
    # A case may name its tools alone; where it gives details, a tool only called in the
    # history is not declared.
    declared = {t.name for t in request.tool_details if t.declared} \
        if len(request.tool_details) else set(request.tools)

    def insisting(names: tuple[str, ...]) -> str | None:
        forced = choice not in ("", "none", "auto", "required") and choice in names
        if forced or (choice == "required" and declared and declared <= set(names)):
            return "tool_choice"
        return None
    return insisting


def _compare(expect: Mapping[str, Any], outcome: Outcome, request: Any,
             seen_ids: set[str]) -> list[str]:
    errs: list[str] = []
    unknown = set(expect) - EXPECT_KEYS
    if unknown:
        errs.append(f"unknown expect keys: {', '.join(sorted(unknown))}")
    # As serve decides: a deny wins; then a stripped tool the request insists on.
    refused, would_refuse = outcome.strip_refusals(_insisting(request)) \
        if outcome.strip_hits else (None, None)
    if "denied" in expect:
        want = _id_or_false(expect["denied"])
        got = outcome.denied.policy_id if outcome.denied else refused
        if want != got:
            errs.append(f"denied: expected {want or 'not denied'}, got {got or 'not denied'}")
    if "would_deny" in expect:
        want = _id_or_false(expect["would_deny"])
        got = outcome.would_deny.policy_id if outcome.would_deny else would_refuse
        if want != got:
            errs.append(f"would_deny: expected {want or 'not denied'}, "
                        f"got {got or 'not denied'}")
    lists = {"allowed_candidates": [c.model for c in outcome.allowed_candidates],
             "required_redactions": sorted(outcome.required_redactions),
             "tools_denied": list(outcome.tools_denied),
             "tools_stripped": list(outcome.tools_to_strip)}
    for key, got_list in lists.items():
        if key in expect:
            want_list = list(expect[key] or [])
            if key == "required_redactions":
                want_list = sorted(want_list)
            if want_list != got_list:
                errs.append(f"{key}: expected {want_list}, got {got_list}")
    decisions = expect.get("decisions") or {}
    by_id = {r.policy_id: r for r in outcome.records}
    for pid, want in decisions.items():
        record = by_id.get(pid)
        if record is None:
            errs.append(f"decisions.{pid}: no such policy")
            continue
        seen_ids.add(pid)
        if record.decision != want:
            errs.append(f"decisions.{pid}: expected {want}, got {record.decision}"
                        + (f" ({record.reason})" if record.reason else ""))
    return errs


def run(directory: str | Path) -> Report:
    report = Report()
    root = Path(directory)
    for file in _case_files(root, report) if root.is_dir() else [root]:
        _run_file(file, report)
    return report


def _case_files(root: Path, report: Report) -> list[Path]:
    """The YAML files below `root`, through linked directories too (once each); a
    directory that cannot be read is a load error. (rglob skipped both in silence:
    half the cases went unrun, and the run passed.)"""
    found: set[Path] = set()
    seen: set[str] = set()

    def unreadable(exc: OSError) -> None:
        report.load_errors.append(Problem(str(exc.filename), 0, "", f"cannot read: {exc}"))

    for where, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(where)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        found.update(Path(where, n) for n in names if n.endswith((".yaml", ".yml")))
    return sorted(found)


def _run_file(file: Path, report: Report) -> None:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        report.load_errors.append(Problem(str(file), 0, "", f"cannot read: {exc}"))
        return
    doc, problems = load_yaml(text, str(file))
    if problems:
        report.load_errors += problems
        return
    if not isinstance(doc, dict) or "cases" not in doc:
        return  # not a case file (e.g. a policy file beside the cases)
    extra = set(doc) - FILE_KEYS
    if extra:
        report.load_errors.append(Problem(str(file), 1, "",
                                          f"unknown keys: {', '.join(sorted(extra))}"))
        return
    cases = doc["cases"] or []
    if not isinstance(cases, list):
        report.load_errors.append(Problem(str(file), line_of(doc, ["cases"]), "cases",
                                          "must be a list of cases"))
        return
    try:
        policy_set, models, warnings = _load_suite(file, doc)
    except PolicyError as exc:
        report.load_errors += exc.details
        return
    except (OSError, ValueError) as exc:
        report.load_errors.append(Problem(str(file), 0, "", str(exc)))
        return
    report.warnings += [w for w in warnings if w not in report.warnings]
    for p in policy_set.policies:
        report.coverage.setdefault(p.id, PolicyCoverage(p.effect))
    for i, case in enumerate(cases):
        line = cases.item_lines[i] if hasattr(cases, "item_lines") else 0
        # A case of the wrong shape is a broken test file (exit 2), not a failed case.
        problems = _shape_problems(str(file), case, f"cases[{i}]", line)
        if problems:
            report.load_errors += problems
            continue
        _run_case(case, f"{file}:{line}", str(case.get("name", f"case {i + 1}")),
                  policy_set, models, report)


def _shape_problems(file: str, case: Any, where: str, line: int) -> list[Problem]:
    if not isinstance(case, Mapping):
        return [Problem(file, line, where, "a case must be a mapping")]
    problems = _misshapen(file, case, CASE_SHAPES, where)
    expect = case.get("expect")
    if isinstance(expect, Mapping):
        problems += _misshapen(file, expect, EXPECT_SHAPES, f"{where}.expect")
    return problems


def _misshapen(file: str, values: Mapping[str, Any], shapes: Mapping[str, type],
               where: str) -> list[Problem]:
    return [Problem(file, line_of(values, [key]), f"{where}.{key}",
                    "must be a mapping" if kind is Mapping else "must be a list")
            for key, kind in shapes.items()
            if values.get(key) is not None and not isinstance(values[key], kind)]


def _subject(subject: Any) -> Any:
    """A case's subject with user, groups and roles filled from its claims as ATP fills
    them from a verified token (values the case gives win)."""
    if not isinstance(subject, Mapping) or subject.get("claims") is None:
        return subject
    return {**claimed_subject(subject["claims"]), **subject}


def _run_case(case: Mapping[str, Any], where: str, name: str, policy_set: PolicySet,
              models: dict[str, CandidateInfo], report: Report) -> None:
    errs: list[str] = []
    unknown = set(case) - CASE_KEYS
    if unknown:
        errs.append(f"unknown case keys: {', '.join(sorted(unknown))}")
    try:
        # As serve fills them, unless the case says otherwise.
        context = {"time": CASE_TIME, "environment": policy_set.settings.environment,
                   **(case.get("context") or {})}
        attrs = build_attributes(_subject(case.get("subject")), case.get("request"), context)
        candidates = _candidates(case.get("candidates"), models)
    except (AttributeError_, TypeError, ValueError) as exc:
        report.failed += 1
        report.failures.append((where, name, [f"bad attributes: {exc}"]))
        return
    outcome = policy_set.evaluate(attrs, candidates)
    asserted: set[str] = set()
    errs += _compare(case.get("expect") or {}, outcome, attrs.request, asserted)
    for record in outcome.records:
        cov = report.coverage[record.policy_id]
        cov.evaluated += 1
        if record.decision == "error":
            cov.errors += 1
        elif record.decision == "not_applicable":
            cov.not_applicable += 1
        elif record.decision in MATCHED and not (
                record.effect != "allow" and record.decision == "allow"):
            cov.matched += 1
        else:
            cov.not_matched += 1
        if record.policy_id in asserted:
            cov.asserted += 1
    if errs:
        report.failed += 1
        report.failures.append((where, name, errs))
    else:
        report.passed += 1


def print_report(report: Report, out: TextIO) -> None:
    for problem in report.load_errors:
        print(f"ERROR {problem}", file=out)
    for problem in report.warnings:
        print(problem, file=out)
    for where, name, errs in report.failures:
        print(f"FAIL  {where}: {name}", file=out)
        for err in errs:
            print(f"        {err}", file=out)
    cov = report.coverage
    if cov:
        width = max(len(pid) for pid in cov)
        print(f"\nCoverage ({len(cov)} policies):", file=out)
        print(f"  {'policy':<{width}}  {'effect':<8} {'evaluated':>9} {'matched':>7} "
              f"{'not-matched':>11} {'errors':>6} {'n/a':>4} {'asserted':>8}", file=out)
        for pid in sorted(cov):
            c = cov[pid]
            print(f"  {pid:<{width}}  {c.effect:<8} {c.evaluated:>9} {c.matched:>7} "
                  f"{c.not_matched:>11} {c.errors:>6} {c.not_applicable:>4} "
                  f"{c.asserted:>8}", file=out)
        effects: dict[str, list[PolicyCoverage]] = {}
        for c in cov.values():
            effects.setdefault(c.effect, []).append(c)
        parts = []
        for effect in sorted(effects):
            group = effects[effect]
            parts.append(f"{effect} {sum(1 for c in group if c.matched)}/{len(group)} "
                         f"({sum(c.matched for c in group)} matches)")
        print("  effects matched by a case: " + ", ".join(parts), file=out)
        total = len(cov)
        print(f"  policies matched: {sum(1 for c in cov.values() if c.matched)}/{total}; "
              f"both outcomes: "
              f"{sum(1 for c in cov.values() if c.matched and c.not_matched)}/{total}; "
              f"asserted: {sum(1 for c in cov.values() if c.asserted)}/{total}", file=out)
    print(f"policy tests: {report.passed} passed, {report.failed} failed"
          + (f", {len(report.load_errors)} load errors" if report.load_errors else ""),
          file=out)
