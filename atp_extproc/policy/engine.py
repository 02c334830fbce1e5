"""Compile and type-check policies with cel-expr-python; evaluate them per request.

Compile (at load and reload): every expression is parsed and type-checked against the
attribute messages of proto/atp/policy.proto; its checked AST gives the attribute paths
it reads, whether it is constant, and whether it has a costly shape. Then all policies are
joined into ONE CEL program over ONE message variable `a` (pb.Attributes):

    cel.bind(subject, a.subject, cel.bind(request, a.request, cel.bind(context, a.context,
      [ [request-level policies...],
        a.candidates.map(resource, [candidate-level policies...]),
        request.tool_details.map(tool, [tool policies...]) ])))

so a request costs one activation, one copy of the document into C++ and one evaluation,
whatever the number of policies (cel-expr-python has ~1.5 µs of fixed cost per eval call
and ~1.5 µs per message variable it copies; twenty separate evaluations would cost more
than the policies themselves). Any error in the batch falls back to evaluating each
policy on its own, so an error is pinned to its policy and target exactly.

Combining (see examples/policies/README.md):
  1. an enforced deny that matched wins (deny overrides allow);
  2. a tool outside scope under `tool_action: deny` denies;
  3. with `policy.default: deny`, a request no enforced allow matched is denied;
  4. restrict removes candidates; none left is a 403 listing every reason;
  5. redact adds data classes (over the candidates left); tools/strip lists tools to strip.
Dry-run policies only record what they would have done (`would_deny` ...) and feed the
hypothetical `Outcome.would_deny`. What a pattern of results decides is worked out once
per PolicySet and looked up after that (`_combine`): the evaluation runs per request, the
combining rules mostly do not.
"""

from __future__ import annotations

import difflib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from cel_expr_python import cel
from cel_expr_python.ext import ext_bindings
from pydantic import ValidationError

from atp_extproc.policy import analysis
from atp_extproc.policy.attributes import Attributes, CandidateInfo, output_bound, safe_name
from atp_extproc.policy.gen.atp import policy_pb2 as pb
from atp_extproc.policy.settings import (
    POLICY_ID,
    RESERVED_NAMESPACE,
    PolicyError,
    PolicySettings,
    PolicySpec,
    Problem,
    SourcedPolicy,
)

PACKAGE = "atp.policy.v1"
REQUEST, CANDIDATE, TOOL = "request", "candidate", "tool"
DEFAULT_DENY_ID = f"{RESERVED_NAMESPACE}.default_deny"
NO_CANDIDATE_ID = f"{RESERVED_NAMESPACE}.no_candidate"
MAX_AST_NODES = 2000

_MESSAGES = {"subject": "Subject", "request": "Request", "resource": "Resource",
             "context": "Context", "tool": "Tool"}
_ENV_LOCK = threading.Lock()
_ENVS: dict[str, Any] = {}


def _type(message: str) -> cel.Type:
    return cel.Type(f"{PACKAGE}.{message}")


def policy_env() -> Any:
    """The environment a single policy is checked in: the five attribute variables, and
    cel.bind (the joined program has it anyway: it binds the attributes with it)."""
    with _ENV_LOCK:
        if "policy" not in _ENVS:
            _ENVS["policy"] = cel.NewEnv(
                variables={name: _type(msg) for name, msg in _MESSAGES.items()},
                extensions=[ext_bindings.ExtBindings()])
        return _ENVS["policy"]


def batch_env() -> Any:
    """The environment of the joined program: one variable, the whole document."""
    with _ENV_LOCK:
        if "batch" not in _ENVS:
            _ENVS["batch"] = cel.NewEnv(variables={"a": _type("Attributes")},
                                        extensions=[ext_bindings.ExtBindings()])
        return _ENVS["batch"]


def _regex_checker() -> Any:
    with _ENV_LOCK:
        if "regex" not in _ENVS:
            env = cel.NewEnv(variables={"p": cel.Type.STRING})
            _ENVS["regex"] = (env, env.compile("''.matches(p)"))
        return _ENVS["regex"]


# -- results --------------------------------------------------------------------------


@dataclass(slots=True)
class DecisionRecord:
    """What one policy decided for one request. Never prompt text or attribute values."""

    policy_id: str
    effect: str
    mode: str            # enforce | dry_run (after the global switch)
    # allow | deny | would_deny | no_match | would_allow | restrict | would_restrict |
    # redact | would_redact | strip | would_strip | not_applicable | error
    decision: str
    reason: str
    attributes_used: tuple[str, ...]
    eval_us: float       # this policy's share of the request's one CEL evaluation
    targets: tuple[str, ...] = ()  # models removed, data classes required, tools hit

    def as_dict(self) -> dict[str, Any]:
        """Like dataclasses.asdict (same keys), without its deep copies."""
        return {"policy_id": self.policy_id, "effect": self.effect, "mode": self.mode,
                "decision": self.decision, "reason": self.reason,
                "attributes_used": list(self.attributes_used), "eval_us": self.eval_us,
                "targets": list(self.targets)}


@dataclass(frozen=True, slots=True)
class Decision:
    """Why a request is refused (403)."""

    policy_id: str
    message: str
    reasons: tuple[str, ...] = ()
    status: int = 403
    code: str = "policy_denied"

    def client_message(self) -> str:
        return f"{self.message} (policy {self.policy_id})"

    def error_body(self) -> bytes:
        """OpenAI-shaped error JSON for the 403."""
        return json.dumps({"error": {
            "message": self.client_message(), "type": "permission_error", "param": None,
            "code": self.code, "policy_id": self.policy_id,
            "reasons": list(self.reasons)}}).encode()


# Decisions that leave the request as it was: their records are left out of the log.
QUIET_DECISIONS = frozenset({"allow", "no_match", "not_applicable"})

# Why a policy that matched or failed somewhere decided as it did: (reason, targets,
# indices of the candidates it removes).
_Why = tuple[str, tuple[str, ...], tuple[int, ...]]
# Per policy, in policy order: ids, effects, modes, attributes used.
_Columns = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]


class Outcome:
    """What the policies decided for one request.

    `records` (one DecisionRecord per policy, in policy order) is built on first use from
    the compact result of the evaluation, so a request pays for the records only when
    something reads them (the exchange's log does, after the request has gone on).
    """

    __slots__ = ("_applied", "_candidates", "_columns", "_decisions", "_reasons", "_records",
                 "_share_us", "allowed_candidates", "denied", "empty_candidate_reasons",
                 "eval_us", "required_redactions", "strip_hits", "tools_denied",
                 "tools_stripped", "tools_to_strip", "would_deny")

    def __init__(self, denied: Decision | None, allowed_candidates: tuple[CandidateInfo, ...],
                 required_redactions: frozenset[str], tools_denied: tuple[str, ...],
                 tools_to_strip: tuple[str, ...], empty_candidate_reasons: tuple[str, ...],
                 would_deny: Decision | None, eval_us: float, *,
                 columns: _Columns = ((), (), (), ()), decisions: Sequence[str] = (),
                 reasons: Sequence[str] = (), applied: Mapping[int, _Why] | None = None,
                 candidates: Sequence[CandidateInfo] = (), tools_stripped: tuple[str, ...] = (),
                 strip_hits: tuple[tuple[str, str, bool], ...] = ()):
        # The enforced deny that won (deny overrides allow), or None: the request may go.
        self.denied = denied
        # Candidates left after restrict, in the order given.
        self.allowed_candidates = allowed_candidates
        # Data classes that must be redacted before the request leaves.
        self.required_redactions = required_redactions
        self.tools_denied = tools_denied
        # Declared tools to remove from the body's `tools` before it leaves.
        self.tools_to_strip = tools_to_strip
        # The same tools as a log names them (safe_name, numbered as decision targets are).
        self.tools_stripped = tools_stripped
        # (tool, policy id, enforced) of every strip, dry-run ones too: a stripped tool
        # the request insists on is a refusal, named by strip_refusals.
        self.strip_hits = strip_hits
        self.empty_candidate_reasons = empty_candidate_reasons
        # What full enforcement (every dry-run policy enforced) would have done.
        self.would_deny = would_deny
        self.eval_us = eval_us
        # The evaluation's time before combining: each record's `eval_us` is its share.
        self._share_us = eval_us
        # Per policy, in order: its id, effect, mode and attributes used; its decision and
        # the reason it has when it did not match anywhere.
        self._columns = columns
        self._decisions = decisions
        self._reasons = reasons
        # Policy index → (reason, targets, candidates removed) of the policies that matched
        # or failed somewhere.
        self._applied = applied or {}
        self._candidates = candidates
        self._records: list[DecisionRecord] | None = None

    def strip_refusals(self, insisting: Callable[[tuple[str, ...]], str | None]
                       ) -> tuple[str | None, str | None]:
        """The strip policies that refuse this request, as it insists on a tool they strip:
        (the enforced one, the one full enforcement names), each a policy id or None.
        `insisting(names)` is the field that insists on one of the tools `names` (a tool
        choice forcing one, a Responses input item declaring one), or None. The one named
        is the first whose tool alone makes that field insist; where only their tools
        together do (`required` with none left), the first of them."""
        enforced = self.tools_to_strip
        field = insisting(enforced) if enforced else None
        if field is not None:
            named = self._stripper(insisting, field, (), enforced=True)
            return named, named
        every = tuple(dict.fromkeys(name for name, _, _ in self.strip_hits))
        field = insisting(every) if set(every) != set(enforced) else None
        if field is None:
            return None, None
        return None, self._stripper(insisting, field, enforced, enforced=False)

    def _stripper(self, insisting: Callable[[tuple[str, ...]], str | None], field: str,
                  stripped: tuple[str, ...], enforced: bool) -> str:
        hits = [(name, pid) for name, pid, on in self.strip_hits if on is enforced]
        for name, pid in hits:
            if insisting((*stripped, name)) == field:
                return pid
        return hits[0][1]

    def restrictor(self, servable: Iterable[str], allowed: Sequence[str] | None = None
                   ) -> str | None:
        """The restrict policy that leaves none of the models `servable` to serve: the
        enforced one that removed them; or, given `allowed` (the models enforced
        policies allow), the dry-run one, if with every dry-run one enforced none would
        be left. ATP's own id (NO_CANDIDATE_ID) when several removed one, as for a
        route without an objective."""
        can_serve = set(servable)
        decision = "restrict" if allowed is None else "would_restrict"
        removers = [r for r in self.records
                    if r.decision == decision and can_serve.intersection(r.targets)]
        if allowed is not None:
            removed = {t for r in removers for t in r.targets}
            if any(n in allowed and n not in removed for n in can_serve):
                return None
        ids = {r.policy_id for r in removers}
        return None if not ids else ids.pop() if len(ids) == 1 else NO_CANDIDATE_ID

    @property
    def decisions(self) -> dict[str, str]:
        """policy id → decision, without building the records."""
        return dict(zip(self._columns[0], self._decisions, strict=True))

    @property
    def records(self) -> list[DecisionRecord]:
        if self._records is None:
            ids, effects, modes, used = self._columns
            share = self._share()
            # Every policy as if it had not matched anywhere, then those that did.
            out = list(map(DecisionRecord, ids, effects, modes, self._decisions, self._reasons,
                           used, repeat(share)))
            for i in self._applied:
                out[i] = self._applied_record(i, share)
            self._records = out
        return self._records

    def _share(self) -> float:
        ids = self._columns[0]
        return round(self._share_us / len(ids), 2) if ids else 0.0

    def _record(self, i: int, share: float) -> DecisionRecord:
        if i in self._applied:
            return self._applied_record(i, share)
        ids, effects, modes, used = self._columns
        return DecisionRecord(ids[i], effects[i], modes[i], self._decisions[i],
                              self._reasons[i], used[i], share)

    def _applied_record(self, i: int, share: float) -> DecisionRecord:
        ids, effects, modes, used = self._columns
        reason, targets, removed = self._applied[i]
        if removed:
            targets = tuple([self._candidates[j].model for j in removed])
        return DecisionRecord(ids[i], effects[i], modes[i], self._decisions[i], reason,
                              used[i], share, targets)

    def log_fields(self) -> dict[str, Any]:
        """For the exchange's structured log record (JSON-ready): every policy's decision,
        and the full record of those that did something.

        Building and encoding a full record for each of 25 policies per request would
        cost more than evaluating them, and the quiet ones say nothing a decision does not.
        """
        effects = self._columns[1]
        # An allow policy that matched is what let a request through under default
        # deny: an audit must be able to name it.
        acted = [i for i, (d, e) in enumerate(zip(self._decisions, effects, strict=True))
                 if d not in QUIET_DECISIONS or (d == "allow" and e == "allow")]
        share = self._share()
        return {"policy_decisions": self.decisions,
                "policy_records": [self._record(i, share).as_dict() for i in acted]}

    def __repr__(self) -> str:
        return (f"Outcome(denied={self.denied!r}, allowed_candidates="
                f"{[c.model for c in self.allowed_candidates]}, required_redactions="
                f"{sorted(self.required_redactions)}, tools_denied={self.tools_denied}, "
                f"tools_to_strip={self.tools_to_strip}, would_deny={self.would_deny!r})")


class DecisionStats:
    """Counters by policy, mode and decision; dry-run decisions are counted apart.

    The hot path counts whole decision vectors (one dict update per request); they are
    folded into per-policy counts when read, or when too many distinct vectors pile up.
    """

    MAX_VECTORS = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_policy: dict[tuple[str, str, str], int] = {}
        self._vectors: dict[tuple[Any, ...], int] = {}
        # id(keys) → keys, kept alive so an id is never reused while it is counted.
        self._keys: dict[int, tuple[tuple[str, str], ...]] = {}
        self.requests = 0
        self.denied = 0
        self.would_deny = 0

    def count(self, keys: tuple[tuple[str, str], ...], decisions: tuple[str, ...],
              denied: bool, would_deny: bool) -> None:
        """Count one request; `keys` ((policy id, mode) per decision) is a constant of
        the policy set, so it is keyed by identity, not hashed per request."""
        key = (id(keys), decisions, denied, would_deny)
        with self._lock:
            vectors = self._vectors
            n = vectors.get(key)
            if n is None:
                if len(vectors) >= self.MAX_VECTORS:
                    self._fold()
                    vectors = self._vectors
                self._keys[id(keys)] = keys
                vectors[key] = 1
            else:
                vectors[key] = n + 1

    def _fold(self) -> None:
        counts = self._by_policy
        for (keys_id, decisions, denied, would), n in self._vectors.items():
            keys = self._keys[keys_id]
            self.requests += n
            self.denied += n if denied else 0
            self.would_deny += n if would else 0
            for (pid, mode), decision in zip(keys, decisions, strict=True):
                k = (pid, mode, decision)
                counts[k] = counts.get(k, 0) + n
        self._vectors = {}
        self._keys = {}

    def snapshot(self) -> dict[str, Any]:
        """{requests, denied, would_deny, policies: {id: {mode: {decision: n}}}}."""
        with self._lock:
            self._fold()
            policies: dict[str, dict[str, dict[str, int]]] = {}
            for (pid, mode, decision), n in sorted(self._by_policy.items()):
                policies.setdefault(pid, {}).setdefault(mode, {})[decision] = n
            return {"requests": self.requests, "denied": self.denied,
                    "would_deny": self.would_deny, "policies": policies}


# -- compiled policies ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    id: str
    effect: str
    mode: str
    on_error: str
    action: str
    message: str
    data_classes: frozenset[str]
    level: str
    attributes_used: tuple[str, ...]
    program: Any
    source: SourcedPolicy
    # The decision recorded when the effect applies (deny / would_deny, strip ...).
    applied_decision: str = ""
    classes_sorted: tuple[str, ...] = ()

    @property
    def enforced(self) -> bool:
        """Whether its hits count (dry-run hits only feed would_deny)."""
        return self.mode == "enforce"

    @property
    def idle_decision(self) -> str:
        """Its decision where it matched nowhere."""
        return "no_match" if self.effect == "allow" else "allow"

    @property
    def expression(self) -> str:
        return self.source.spec.expression


_CEL_ERROR = re.compile(r"ERROR: <input>:(\d+):(\d+): ([^\n]*)")
_UNDEFINED_FIELD = re.compile(r"undefined field '([^']*)' not found in struct '([^']*)'")
_UNDECLARED = re.compile(r"undeclared reference to '([^']*)'")
# A call `ns.fn(`: when `ns` is unknown cel-cpp also names `fn`, at its '('.
_NAMESPACED_CALL = re.compile(r"([A-Za-z_]\w*)\s*\.\s*([A-Za-z_]\w*)\s*\(")
# gRPC status codes: cel-cpp prefixes its error texts with one.
_STATUS_CODES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED"})
# cel-cpp's run-time error texts by how they start → the phrase a record shows. The rest
# of a text carries values (a map key, an index, a regex built from the request, a
# number), so none of it is ever copied.
_ERROR_KINDS = (
    ("Key not found in map", "key not found in map"),
    ("No matching overloads found", "no matching overload (a value of another type)"),
    ("Index error", "index error"),
    ("cannot convert string to", "string conversion failed"),
    ("String to Timestamp conversion failed", "string to timestamp conversion failed"),
    ("String to Duration conversion failed", "string to duration conversion failed"),
    ("Type conversion error", "type conversion failed"),
    ("divide by zero", "divide by zero"),
    ("modulus by zero", "modulus by zero"),
    ("integer overflow", "integer overflow"),
    ("unsigned integer overflow", "unsigned integer overflow"),
    ("timestamp overflow", "timestamp overflow"),
    ("duration overflow", "duration overflow"),
    ("int64 out of", "number out of range"),
    ("uint64 out of", "number out of range"),
    ("double out of", "number out of range"),
    ("invalid regular expression", "invalid regular expression"),
    ("Applying SELECT to non-message type", "field selected on a value that has none"),
)


def _struct_fields(full_name: str) -> tuple[str, list[str]]:
    msg = full_name.rsplit(".", 1)[-1]
    roots = [r for r, m in _MESSAGES.items() if m == msg]
    desc = getattr(pb, msg, None)
    names = [f.name for f in desc.DESCRIPTOR.fields] if desc is not None else []
    return (roots[0] if roots else msg), names


def _reword(reason: str) -> str:
    m = _UNDEFINED_FIELD.search(reason)
    if m:
        root, names = _struct_fields(m.group(2))
        hint = difflib.get_close_matches(m.group(1), names, n=1)
        tail = f"; did you mean {root}.{hint[0]}?" if hint else \
            f"; {root} has: {', '.join(names)}"
        return f"unknown attribute {root}.{m.group(1)}{tail}"
    m = _UNDECLARED.search(reason)
    if m:
        name = m.group(1)
        first = name.split(".", 1)[0]
        hint = difflib.get_close_matches(first, list(_MESSAGES), n=1)
        tail = f"; did you mean {hint[0]}{name[len(first):]}?" if hint else ""
        return (f"unknown attribute or function {name!r} (attributes are "
                f"{', '.join(_MESSAGES)}){tail}")
    if reason.startswith("Syntax error:"):
        return "syntax error: " + reason.removeprefix("Syntax error: ").split(" expecting ")[0]
    return reason


def evaluation_error(message: object) -> str:
    """An evaluation error fit for a record: its status code and a fixed phrase for its
    kind, both from the tables above, so no attribute value can be in it."""
    code, sep, text = str(message).partition(": ")
    if not sep or code not in _STATUS_CODES:
        code, text = "ERROR", str(message)
    phrase = next((p for start, p in _ERROR_KINDS if text.startswith(start)),
                  "evaluation failed")
    return f"{code}: {phrase}"


def _expr_problems(sp: SourcedPolicy, text: str) -> list[Problem]:
    found = list(_CEL_ERROR.finditer(text))
    if not found:
        # cel-cpp's own words: "CANCELLED: Expression ... recursion limit" when checked,
        # "<input>:-1:-1: Exceeded max recursion depth of 32 when parsing" (a long `+`
        # chain), the latter repeated over lines, which check then printed twice.
        if "recursion limit" in text or "max recursion depth" in text:
            text = ("nests too deeply: cel-cpp refuses more than 32 levels; flatten it "
                    "(fewer parentheses, fewer terms in one `+` chain, `x in [...]` "
                    "instead of chained conditions)")
        else:
            text = "; ".join(dict.fromkeys(line.strip() for line in text.splitlines()
                                           if line.strip()))
        return [Problem(sp.file, sp.expr_line, sp.spec.id, f"expression: {text}")]
    # What an unknown attribute then breaks ("expression of type '*error*' cannot be ...")
    # says nothing more than the first error.
    found = [m for m in found if "'*error*'" not in m.group(3)] or found
    expression = sp.spec.expression
    at = [_offset(expression, int(m.group(1)), int(m.group(2))) for m in found]
    undeclared: dict[int, str] = {}
    for offset, m in zip(at, found, strict=True):
        name = _UNDECLARED.search(m.group(3))
        if name:
            undeclared[offset] = name.group(1)
    # An unknown `ns.fn(...)` (an extension ATP's CEL lacks, e.g. math.greatest) is two
    # unknown names to cel-cpp: one error, for the call, says what it is.
    calls: dict[int, str] = {}
    for offset, name in undeclared.items():
        call = _NAMESPACED_CALL.match(expression, offset)
        if call and call[1] == name and undeclared.get(call.end() - 1) == call[2]:
            calls[offset] = (f"unknown function {name}.{call[2]}(): ATP's CEL has the "
                             "standard functions and cel.bind")
            calls[call.end() - 1] = ""  # `fn` alone: said by the call's error
    out = []
    for offset, m in zip(at, found, strict=True):
        reason = calls.get(offset, _reword(m.group(3).strip()))
        if reason:
            out.append(Problem(sp.file, sp.file_line(offset), sp.spec.id,
                               f"{reason} (expression line {m.group(1)}, column "
                               f"{m.group(2)})"))
    return out


def _offset(expression: str, cel_line: int, col: int) -> int:
    """The offset in `expression` of cel-cpp's (line, column)."""
    lines = expression.split("\n")
    return sum(len(text) + 1 for text in lines[:cel_line - 1]) + col - 1


def _finding_problem(sp: SourcedPolicy, offset: int, reason: str, severity: str) -> Problem:
    line, col = analysis.offset_to_line_col(sp.spec.expression, offset)
    return Problem(sp.file, sp.file_line(offset), sp.spec.id,
                   f"{reason} (expression line {line}, column {col})",
                   "warning" if severity == "warning" else "error")


def _level(spec: PolicySpec, roots: frozenset[str]) -> str:
    if spec.effect == "tools":
        return TOOL
    if spec.effect in ("restrict", "redact") and "resource" in roots:
        return CANDIDATE
    return REQUEST


def _root_rules(sp: SourcedPolicy, roots: frozenset[str]) -> list[Problem]:
    spec, out = sp.spec, []
    line = sp.expr_line or sp.line

    def add(reason: str, severity: str = "error") -> None:
        out.append(Problem(sp.file, line, spec.id, reason, severity))  # type: ignore[arg-type]

    if "tool" in roots and spec.effect != "tools":
        add(f"tool.* is only set while a tools policy runs; this policy's effect is "
            f"{spec.effect}")
    if "resource" in roots and spec.effect in ("deny", "allow"):
        add(f"{spec.effect} policies are decided once per request and cannot read "
            "resource.*; use effect: restrict to keep a request off some models")
    if "resource" in roots and spec.effect == "tools":
        add("tools policies cannot read resource.*: tools are decided before routing")
    if spec.effect == "restrict" and "resource" not in roots:
        add("reads no resource.*: when true it removes every candidate (that is a deny)",
            "warning")
    if spec.effect == "tools" and "tool" not in roots:
        add("reads no tool.*: when true every tool of the request is out of scope",
            "warning")
    return out


# cel-cpp refuses a program of more than 100,000 code points: past this, the policies
# are joined into several programs (about 40 allow-lists of 150 tenants each fill one).
MAX_BATCH_CODEPOINTS = 99_000


def _batch_source(groups: Mapping[str, Sequence[str]]) -> str:
    """The joined program over the expressions of each level (see the module doc)."""
    def join(level: str) -> str:
        # Newline before ')' so a trailing // comment cannot swallow it.
        return "[" + ", ".join(f"(\n{e}\n)" for e in groups.get(level, ())) + "]"

    # One message variable `a` (one copy into C++ per request); cel.bind gives the
    # policies their own names for its parts.
    return ("cel.bind(subject, a.subject, cel.bind(request, a.request, "
            "cel.bind(context, a.context, "
            f"[{join(REQUEST)}, a.candidates.map(resource, {join(CANDIDATE)}), "
            f"request.tool_details.map(tool, {join(TOOL)})])))")


_EMPTY_BATCH_CODEPOINTS = len(_batch_source({}))


def _batch_problem(sp: SourcedPolicy, level: str) -> Problem | None:
    """Why the policy does not compile at its place in the joined program, or None.

    The joined program nests a policy about 7 levels deeper than it is on its own and
    cel-cpp refuses nesting past 32: caught here, the policy is named with its file and
    line, rather than the whole set failing as "<batch>"."""
    try:
        batch_env().compile(_batch_source({level: [sp.spec.expression]}))
    except RuntimeError as exc:
        reason = ("expression nests too deeply: joined with the other policies it passes "
                  "cel-cpp's limit of 32 levels; flatten it (e.g. `x in [...]` or a map "
                  "lookup instead of chained ternaries) or split it into several policies"
                  if "recursion" in str(exc) else
                  f"does not compile joined with the other policies: {exc}")
        return Problem(sp.file, sp.expr_line or sp.line, sp.spec.id, reason)
    return None


class PolicySet:
    """A compiled, immutable set of policies; swap it whole on reload."""

    def __init__(self, policies: tuple[CompiledPolicy, ...], settings: PolicySettings,
                 warnings: tuple[Problem, ...], stats: DecisionStats | None = None):
        self.policies = policies
        self.settings = settings
        self.warnings = warnings
        self.stats = stats if stats is not None else DecisionStats()
        self._request = tuple(p for p in policies if p.level == REQUEST)
        self._candidate = tuple(p for p in policies if p.level == CANDIDATE)
        self._tool = tuple(p for p in policies if p.level == TOOL)
        self._columns: _Columns = (tuple(p.id for p in policies),
                                   tuple(p.effect for p in policies),
                                   tuple(p.mode for p in policies),
                                   tuple(p.attributes_used for p in policies))
        self._stat_keys = tuple((p.id, p.mode) for p in policies)
        # Policy index of each slot of the request / candidate / tool results.
        self._req_idx = tuple(i for i, p in enumerate(policies) if p.level == REQUEST)
        self._cand_idx = tuple(i for i, p in enumerate(policies) if p.level == CANDIDATE)
        self._tool_idx = tuple(i for i, p in enumerate(policies) if p.level == TOOL)
        # Decisions and reasons when nothing matched, by (any candidates, any tools).
        self._no_match = {(has_cand, has_tools): _idle(policies, has_cand, has_tools)
                          for has_cand in (False, True) for has_tools in (False, True)}
        self._default_deny_mode = ("dry_run" if settings.mode == "dry_run" else "enforce") \
            if settings.default == "deny" else None
        self._combined: dict[tuple[Any, ...], _Combined] = {}
        self._env = batch_env()
        self._batches = self._compile_batches() if policies else ()

    # -- compile ----------------------------------------------------------------------

    @classmethod
    def compile(cls, policies: Iterable[SourcedPolicy | PolicySpec | Mapping[str, Any]],
                settings: PolicySettings | None = None, source: str = "<policies>", *,
                known_values: Mapping[str, Iterable[str]] | None = None,
                known_data_classes: Iterable[str] | None = None,
                stats: DecisionStats | None = None) -> PolicySet:
        """Type-check every policy; raise PolicyError listing every error (with lines)."""
        policy_set, problems = cls.lint(policies, settings, source, known_values=known_values,
                                        known_data_classes=known_data_classes, stats=stats)
        errors = [p for p in problems if p.severity == "error"]
        if errors or policy_set is None:
            raise PolicyError(errors)
        return policy_set

    @classmethod
    def lint(cls, policies: Iterable[SourcedPolicy | PolicySpec | Mapping[str, Any]],
             settings: PolicySettings | None = None, source: str = "<policies>", *,
             known_values: Mapping[str, Iterable[str]] | None = None,
             known_data_classes: Iterable[str] | None = None,
             stats: DecisionStats | None = None) -> tuple[PolicySet | None, list[Problem]]:
        """Like compile, but returns (set or None, errors and warnings) for `check`."""
        settings = settings or PolicySettings()
        known = dict(known_values or {})
        classes = frozenset(known_data_classes) if known_data_classes is not None else None
        if classes is not None:
            known.setdefault("request.data_classes{}", classes)
        env = policy_env()
        problems: list[Problem] = []
        compiled: list[CompiledPolicy] = []
        first_seen: dict[str, SourcedPolicy] = {}
        for n, item in enumerate(policies):
            try:
                sp = _sourced(item, source)
            except ValidationError as exc:
                problems += [Problem(source, 0, f"policies[{n}]." + ".".join(
                    str(x) for x in e["loc"]), e["msg"]) for e in exc.errors()]
                continue
            spec = sp.spec
            id_line = sp.field_lines.get("id", sp.line)
            ok = True
            if not POLICY_ID.fullmatch(spec.id):
                problems.append(Problem(sp.file, id_line, spec.id,
                                        "policy id must be namespaced like team.rule "
                                        "(lowercase letters, digits, _ or -, dot-separated)"))
                ok = False
            elif spec.id.split(".", 1)[0] == RESERVED_NAMESPACE:
                problems.append(Problem(sp.file, id_line, spec.id,
                                        f"the {RESERVED_NAMESPACE}.* namespace is ATP's own"))
                ok = False
            if spec.id in first_seen:
                prev = first_seen[spec.id]
                problems.append(Problem(sp.file, id_line, spec.id,
                                        f"duplicate policy id (first at {prev.file}:"
                                        f"{prev.field_lines.get('id', prev.line)})"))
                ok = False
            else:
                first_seen[spec.id] = sp
            if classes is not None:
                for i, dc in enumerate(spec.data_classes):
                    if dc not in classes:
                        problems.append(Problem(
                            sp.file, sp.field_lines.get(
                                f"data_classes[{i}]",
                                sp.field_lines.get("data_classes", sp.line)), spec.id,
                            f"unknown data class {dc!r} (known: {', '.join(sorted(classes))})"))
                        ok = False
            try:
                program = env.compile(spec.expression)
            except RuntimeError as exc:
                problems += _expr_problems(sp, str(exc))
                continue
            rtype = program.return_type()
            if rtype != cel.Type.BOOL:
                problems.append(Problem(sp.file, sp.expr_line or sp.line, spec.id,
                                        f"expression must be a bool, not {rtype.name().lower()}"
                                        " (compare it explicitly, e.g. `== true`)"))
                continue
            an = analysis.analyze(program.serialize(), known, per_tool=spec.effect == "tools")
            before = len(problems)
            problems += _root_rules(sp, an.roots)
            problems += _constant_problems(sp, an, program)
            for finding in an.findings:
                problems.append(_finding_problem(sp, finding.offset, finding.reason,
                                                 finding.severity))
            if an.constant is not analysis.NO_ATTRIBUTES:  # else evaluated whole
                problems += _probe_problems(sp, an.probes)
            for offset, pattern in an.patterns:
                bad = _bad_regex(pattern)
                if bad:
                    problems.append(_finding_problem(sp, offset, f"invalid regex: {bad}",
                                                     "error"))
            if an.node_count > MAX_AST_NODES:
                problems.append(Problem(sp.file, sp.expr_line or sp.line, spec.id,
                                        f"expression too large ({an.node_count} nodes; limit "
                                        f"{MAX_AST_NODES}): split it into several policies"))
            if any(p.severity == "error" for p in problems[before:]) or not ok:
                continue  # (joined with the others it would only fail again, as noise)
            level = _level(spec, an.roots)
            batch = _batch_problem(sp, level)
            if batch is not None:
                problems.append(batch)
                continue
            compiled.append(CompiledPolicy(
                id=spec.id, effect=spec.effect, mode=settings.effective_mode(spec),
                on_error=spec.on_error, action=spec.action,
                message=spec.message or _default_message(spec),
                data_classes=frozenset(spec.data_classes), level=level,
                attributes_used=an.attributes_used, program=program, source=sp,
                applied_decision=_applied_decision(spec, settings.effective_mode(spec)),
                classes_sorted=tuple(sorted(spec.data_classes))))
        if any(p.severity == "error" for p in problems):
            return None, problems
        warnings = tuple(p for p in problems if p.severity == "warning")
        try:
            return cls(tuple(compiled), settings, warnings, stats), problems
        except PolicyError as exc:  # never expected (see _batch_problem); `check` lists it
            return None, problems + list(exc.details)

    def _compile_batches(self) -> tuple[Any, ...]:
        """The joined program, or several where one would pass cel-cpp's size limit."""
        chunks: list[dict[str, list[str]]] = [{}]
        size = _EMPTY_BATCH_CODEPOINTS
        for level, group in ((REQUEST, self._request), (CANDIDATE, self._candidate),
                             (TOOL, self._tool)):
            for policy in group:
                # The expression, its brackets, newlines and separator.
                grows = len(policy.expression) + 6
                if size + grows > MAX_BATCH_CODEPOINTS and chunks[-1]:
                    chunks.append({})
                    size = _EMPTY_BATCH_CODEPOINTS
                chunks[-1].setdefault(level, []).append(policy.expression)
                size += grows
        try:
            return tuple(self._env.compile(_batch_source(chunk)) for chunk in chunks)
        except RuntimeError as exc:  # pragma: no cover - lint compiles each one at its place
            raise PolicyError([Problem("<batch>", 0, "", f"internal: batch program does not "
                                       f"compile: {exc}")]) from None

    def _eval_batches(self, doc: pb.Attributes) -> Any:
        """[request results, per-candidate rows, per-tool rows] from the joined programs;
        anything else (an evaluation error) as it came."""
        # `data=` rather than an Activation: one Python object less per request.
        first = self._batches[0].eval(data={"a": doc}).plain_value()
        if len(self._batches) == 1 or not isinstance(first, list):
            return first
        parts = [first]
        for batch in self._batches[1:]:
            part = batch.eval(data={"a": doc}).plain_value()
            if not isinstance(part, list):
                return part
            parts.append(part)
        return [[r for part in parts for r in part[0]],
                *([[r for part in parts for r in part[level][row]]
                   for row in range(len(first[level]))] for level in (1, 2))]

    # -- evaluate ---------------------------------------------------------------------

    def evaluate(self, attrs: Attributes | pb.Attributes,
                 candidates: Sequence[CandidateInfo] = ()) -> Outcome:
        """Decide one request. `candidates`: the models routing may choose, in order.

        Sets the document's `candidates` to these (each with its estimated cost).
        """
        t0 = time.perf_counter_ns()
        doc = self._prepare(attrs, candidates)
        results: Any = None
        if self._batches:
            try:
                value = self._eval_batches(doc)
            except Exception:  # the slow path pins any failure on its policy
                value = None
            if isinstance(value, list):
                results = value
        if results is None:
            results = self._evaluate_each(doc)
        elapsed = (time.perf_counter_ns() - t0) / 1000.0
        outcome = self._combine(results, candidates, doc.request, elapsed)
        outcome.eval_us = (time.perf_counter_ns() - t0) / 1000.0
        return outcome

    def _prepare(self, attrs: Attributes | pb.Attributes,
                 candidates: Sequence[CandidateInfo]) -> pb.Attributes:
        doc = attrs.doc if isinstance(attrs, Attributes) else attrs
        cands = doc.candidates
        if cands:
            del cands[:]
        if candidates and self._candidate:
            request = doc.request
            token_estimate, max_tokens = request.token_estimate, output_bound(request)
            for c in candidates:
                c.add_to(cands, token_estimate, max_tokens)
        return doc

    def raw_results(self, attrs: Attributes | pb.Attributes,
                    candidates: Sequence[CandidateInfo] = (), *, batch: bool = True) -> Any:
        """[request results, per-candidate rows, per-tool rows] as evaluate sees them:
        bools, or the error text. batch=False evaluates each policy on its own."""
        doc = self._prepare(attrs, candidates)
        if batch and self._batches:
            return self._eval_batches(doc)
        return self._evaluate_each(doc)

    def _evaluate_each(self, doc: pb.Attributes) -> list[Any]:
        """The slow path: each policy on its own, so an error names its policy."""
        env = policy_env()
        request = doc.request
        resources = list(doc.candidates)
        base = {"subject": doc.subject, "request": request, "context": doc.context}
        act = env.Activation(base)

        def run(p: CompiledPolicy, activation: Any) -> Any:
            try:
                value = p.program.eval(activation).plain_value()
            except Exception as exc:
                return evaluation_error(exc)
            return value if isinstance(value, bool) else evaluation_error(value)

        req = [run(p, act) for p in self._request]
        cand = []
        for res in resources:
            cact = env.Activation({**base, "resource": res})
            cand.append([run(p, cact) for p in self._candidate])
        tools = []
        for tool in request.tool_details:
            tact = env.Activation({**base, "tool": tool})
            tools.append([run(p, tact) for p in self._tool])
        return [req, cand, tools]

    def _combine(self, results: list[Any], candidates: Sequence[CandidateInfo],
                 request: pb.Request, elapsed_us: float) -> Outcome:
        req_res, cand_res, tool_res = results
        # What the policies decide is a function of their results, the number of
        # candidates and the tools they hit; few such patterns recur, so each is worked
        # out once (per PolicySet: a reload starts afresh) and looked up after that.
        key = (len(candidates), tuple(req_res), tuple(map(tuple, cand_res)),
               tuple(map(tuple, tool_res)))
        done = self._combined.get(key)
        if done is None or (done.tool_names and not done.same_tools(request.tool_details)):
            done = self._decide_results(results, len(candidates), request.tool_details)
            if len(self._combined) >= _MAX_PATTERNS:
                self._combined.clear()
            self._combined[key] = done
        kept = done.kept
        allowed = tuple(candidates) if kept is None else tuple([candidates[i] for i in kept])
        self.stats.count(self._stat_keys, done.decisions, done.denied is not None,
                         done.would_deny is not None)
        return Outcome(done.denied, allowed, done.redactions, done.tools_denied,
                       done.tools_strip, done.empty_reasons, done.would_deny, elapsed_us,
                       columns=self._columns, decisions=done.decisions,
                       reasons=done.reasons, applied=done.applied, candidates=candidates,
                       tools_stripped=done.tools_stripped, strip_hits=done.strip_hits)

    def _decide_results(self, results: list[Any], n_cand: int,
                        tools: Sequence[pb.Tool]) -> _Combined:
        """What one pattern of results decides (see _combine)."""
        req_res, cand_res, tool_res = results
        n_tools = len(tool_res)
        # Only policies that matched or failed somewhere need any work, as (policy index,
        # one result per target).
        hit: list[tuple[int, Sequence[Any]]] = [
            (idx, (r,)) for idx, r in zip(self._req_idx, req_res, strict=True)
            if r is not False]
        for rows, n_rows, order in ((cand_res, n_cand, self._cand_idx),
                                    (tool_res, n_tools, self._tool_idx)):
            if n_rows and order:
                hit += [(idx, column) for idx, column in
                        zip(order, zip(*rows, strict=True), strict=True)
                        if column.count(False) != n_rows]
        hit.sort()  # policy order; indices are unique, so results are never compared
        idle, reasons = self._no_match[bool(n_cand), bool(n_tools)]
        decided = list(idle)
        hits = _Hits()
        policies = self.policies
        applied: dict[int, _Why] = {}
        for idx, outcomes in hit:
            decided[idx], applied[idx] = _note(policies[idx], outcomes, hits, n_cand, tools)
        denied, kept, empty_reasons, redactions, tools_denied, strip = self._decide(
            hits, n_cand, tools)
        if kept is not None:
            _moot_redactions(hits, kept, [(idx, policies[idx]) for idx, _ in hit], decided,
                             applied)
        if hits.any_dry or self._default_deny_mode == "dry_run":
            would = self._would_deny(hits, n_cand, tools)
        else:
            would = denied
        seen = sorted({i for _, _, i in hits.tools})
        strip_hits = tuple(dict.fromkeys((tools[i].name, p.id, enforced)
                                         for p, enforced, i in hits.tools
                                         if p.action != "deny" and tools[i].declared))
        return _Combined(tuple(decided), reasons, applied, denied, would, kept, empty_reasons,
                         redactions, tools_denied, tuple([name for _, name in strip]),
                         tuple([safe_name(name, i) for i, name in strip]),
                         tuple([(i, tools[i].name, tools[i].declared) for i in seen]),
                         strip_hits)

    def _decide(self, hits: _Hits, n_cand: int, tools: Sequence[pb.Tool]
                ) -> tuple[Decision | None, tuple[int, ...] | None, tuple[str, ...],
                           frozenset[str], tuple[str, ...], tuple[tuple[int, str], ...]]:
        """What the enforced hits decide (dry-run hits only feed _would_deny): the
        refusal, the candidates kept (None: all), why none is left, redactions, tools
        denied, and the (index, name) of each tool to strip."""
        tools_denied: list[str] = []
        tools_strip: dict[str, int] = {}
        deny_tool_hits: list[tuple[CompiledPolicy, str]] = []
        for p, enforced, i in hits.tools:
            if not enforced:
                continue
            name = tools[i].name
            if p.action == "deny":
                if name not in tools_denied:
                    tools_denied.append(name)
                deny_tool_hits.append((p, name))
            elif tools[i].declared:
                tools_strip.setdefault(name, i)
        denied = _deny([(p, msg) for p, enforced, msg in hits.denies if enforced],
                       deny_tool_hits)
        if denied is None and self._default_deny_mode == "enforce" and not any(hits.allows):
            denied = _DEFAULT_DENY
        kept: list[int] | None = None
        empty_reasons: tuple[str, ...] = ()
        if hits.removed:
            kept = []
            reasons: dict[str, None] = {}
            for i in range(n_cand):
                removers = [p for p, enforced in hits.removed.get(i, ()) if enforced]
                if removers:
                    for p in removers:
                        reasons.setdefault(f"{p.id}: {p.message}", None)
                else:
                    kept.append(i)
            if n_cand and not kept:
                empty_reasons = tuple(reasons)
                if denied is None:
                    denied = _no_candidate(empty_reasons)
        redactions: frozenset[str] = _NO_CLASSES
        if hits.redact_all or hits.redact_cand:
            found: set[str] = set()
            for p, enforced in hits.redact_all:
                if enforced:
                    found |= p.data_classes
            for i in range(n_cand) if kept is None else kept:
                for p, enforced in hits.redact_cand.get(i, ()):
                    if enforced:
                        found |= p.data_classes
            redactions = frozenset(found)
        return (denied, None if kept is None else tuple(kept), empty_reasons, redactions,
                tuple(tools_denied), tuple([(i, name) for name, i in tools_strip.items()]))

    def _would_deny(self, hits: _Hits, n_cand: int,
                    tools: Sequence[pb.Tool]) -> Decision | None:
        """The refusal if every dry-run policy were enforced (the same rules as
        _decide, every hit counted)."""
        denied = _deny([(p, msg) for p, _, msg in hits.denies],
                       [(p, tools[i].name) for p, _, i in hits.tools if p.action == "deny"])
        if denied is not None:
            return denied
        if self._default_deny_mode is not None and not hits.allows:
            return _DEFAULT_DENY
        if n_cand and len(hits.removed) == n_cand:
            return _no_candidate(tuple(dict.fromkeys(
                f"{p.id}: {p.message}" for i in range(n_cand) for p, _ in hits.removed[i])))
        return None


def _deny(denies: Sequence[tuple[CompiledPolicy, str]],
          tool_hits: Sequence[tuple[CompiledPolicy, str]]) -> Decision | None:
    """The refusal of the deny hits (policy, message) and of the tools policies' (policy,
    tool name): the first deny's, else the tools policies'; `reasons` names them all, so
    a client fixes every cause at once."""
    tools = _tools_refusal(tool_hits) if tool_hits else None
    if not denies:
        return tools
    p, msg = denies[0]
    return Decision(p.id, msg, (*(f"{q.id}: {m}" for q, m in denies),
                                *(tools.reasons if tools else ())))


def _tools_refusal(hits: Sequence[tuple[CompiledPolicy, str]]) -> Decision:
    """The refusal of tools policies (tool_action: deny) that hit the (policy, tool name)
    pairs: the first policy's, each policy naming its own tools (one message pinned them
    all on the first: "code execution tools are not allowed (tools: shell,
    search_docs)"), names fit for the client."""
    index: dict[str, int] = {}
    by_policy: dict[str, tuple[CompiledPolicy, list[str]]] = {}
    for p, name in hits:
        shown = safe_name(name, index.setdefault(name, len(index)))
        names = by_policy.setdefault(p.id, (p, []))[1]
        if shown not in names:
            names.append(shown)
    reasons = [(p, f"{p.message} (tools: {', '.join(names)})")
               for p, names in by_policy.values()]
    first, message = reasons[0]
    return Decision(first.id, message, tuple(f"{p.id}: {m}" for p, m in reasons))


def _no_candidate(reasons: tuple[str, ...]) -> Decision:
    """The refusal when restrict left no candidate: the one policy that removed them
    all, or ATP's own id when several did (`reasons`: "policy id: message")."""
    ids = {r.split(":", 1)[0] for r in reasons}
    pid = next(iter(ids)) if len(ids) == 1 else NO_CANDIDATE_ID
    return Decision(pid, "No model may serve this request: " + "; ".join(reasons), reasons)


_NO_CLASSES: frozenset[str] = frozenset()
# Result patterns a PolicySet remembers (see _combine); past this it starts afresh.
_MAX_PATTERNS = 1024


class _Combined:
    """What one pattern of policy results decides (everything but the candidates
    themselves, which are picked by index from each request's own)."""

    __slots__ = ("applied", "decisions", "denied", "empty_reasons", "kept", "reasons",
                 "redactions", "strip_hits", "tool_names", "tools_denied", "tools_strip",
                 "tools_stripped", "would_deny")

    def __init__(self, decisions: tuple[str, ...], reasons: tuple[str, ...],
                 applied: dict[int, _Why],
                 denied: Decision | None, would_deny: Decision | None,
                 kept: tuple[int, ...] | None, empty_reasons: tuple[str, ...],
                 redactions: frozenset[str], tools_denied: tuple[str, ...],
                 tools_strip: tuple[str, ...], tools_stripped: tuple[str, ...],
                 tool_names: tuple[tuple[int, str, bool], ...],
                 strip_hits: tuple[tuple[str, str, bool], ...]):
        self.decisions = decisions
        self.reasons = reasons
        self.applied = applied
        self.denied = denied
        self.would_deny = would_deny
        self.kept = kept
        self.empty_reasons = empty_reasons
        self.redactions = redactions
        self.tools_denied = tools_denied
        self.tools_strip = tools_strip
        self.tools_stripped = tools_stripped
        # (index, name, declared) of each tool a tools policy hit: what was decided
        # about them holds for another request only if its tools there are the same.
        self.tool_names = tool_names
        self.strip_hits = strip_hits

    def same_tools(self, tools: Sequence[pb.Tool]) -> bool:
        for i, name, declared in self.tool_names:
            tool = tools[i]
            if tool.name != name or tool.declared != declared:
                return False
        return True


_DEFAULT_DENY = Decision(DEFAULT_DENY_ID, "No policy allows this request", (
    f"{DEFAULT_DENY_ID}: no enforced allow policy matched, and policy.default is deny",))


class _Hits:
    """What matched in one evaluation, with whether each hit is enforced."""

    __slots__ = ("allows", "any_dry", "denies", "redact_all", "redact_cand", "removed",
                 "tools")

    def __init__(self) -> None:
        self.denies: list[tuple[CompiledPolicy, bool, str]] = []
        self.allows: list[bool] = []
        self.removed: dict[int, list[tuple[CompiledPolicy, bool]]] = {}
        self.redact_all: list[tuple[CompiledPolicy, bool]] = []
        self.redact_cand: dict[int, list[tuple[CompiledPolicy, bool]]] = {}
        self.tools: list[tuple[CompiledPolicy, bool, int]] = []
        self.any_dry = False


# What on_error did, for a failed policy's record. A dry-run policy changes nothing, so
# its record says what enforcing it would do.
_ON_ERROR = {"deny": "request denied", "skip": "policy skipped", "apply": "effect applied"}
_ON_ERROR_DRY = {"deny": "request would be denied (dry run)",
                 "skip": "policy would be skipped (dry run)",
                 "apply": "effect would be applied (dry run)"}


def _note(p: CompiledPolicy, outcomes: Sequence[Any], hits: _Hits, n_cand: int,
          tools: Sequence[pb.Tool]) -> tuple[str, _Why]:
    """Note the hits of a policy that matched or failed somewhere. Returns its decision
    and, for its record, (reason, targets, indices of the candidates it removes: their
    models are each request's own)."""
    enforced = p.enforced
    applies: list[int] = []
    error: str | None = None
    for i, r in enumerate(outcomes):
        if r is True:
            applies.append(i)
        elif r is not False:
            error = r if isinstance(r, str) else "non-bool result"
            if p.on_error == "apply":
                applies.append(i)
    if not enforced:
        hits.any_dry = True
    if error is not None and p.on_error == "deny":
        # The refusal names the policy itself (client_message, reasons): not again here.
        hits.denies.append((p, enforced, "Policy could not be evaluated"))
    effect = p.effect
    reason = p.message if applies else ""
    targets: tuple[str, ...] = ()
    removed: tuple[int, ...] = ()
    if effect == "allow":
        if applies:
            hits.allows.append(enforced)
    elif effect == "deny":
        if applies:
            hits.denies.append((p, enforced, p.message))
    elif effect == "restrict":
        # A request-level restrict removes every candidate or none.
        removed = (tuple(range(n_cand)) if applies else ()) if p.level == REQUEST else \
            tuple(applies)
        by_candidate = hits.removed
        for i in removed:
            if i in by_candidate:
                by_candidate[i].append((p, enforced))
            else:
                by_candidate[i] = [(p, enforced)]
    elif effect == "redact":
        if applies:
            if p.level == REQUEST:
                hits.redact_all.append((p, enforced))
            else:
                for i in applies:
                    hits.redact_cand.setdefault(i, []).append((p, enforced))
            targets = p.classes_sorted
    else:  # tools
        for i in applies:
            hits.tools.append((p, enforced, i))
        # One name a tool: each parallel call of it is an entry of its own.
        targets = tuple(dict.fromkeys([safe_name(tools[i].name, i) for i in applies]))
    if error is not None and applies and p.on_error == "skip":
        # It acted where it matched: skipped only where it failed, it decided the rest.
        return p.applied_decision, (f"{reason}; evaluation error on another "
                                    f"{p.level}: {error}; on_error=skip: skipped there",
                                    targets, removed)
    if error is not None:
        consequence = (_ON_ERROR if enforced else _ON_ERROR_DRY)[p.on_error]
        reason = f"evaluation error: {error}; on_error={p.on_error}: {consequence}"
        return "error", (reason, targets, removed)
    return (p.applied_decision if applies else p.idle_decision), (reason, targets, removed)


def _moot_redactions(hits: _Hits, kept: tuple[int, ...],
                     hit: list[tuple[int, CompiledPolicy]], decided: list[str],
                     applied: dict[int, _Why]) -> None:
    """A candidate-level redact that matched only candidates a restrict removed asks
    nothing of the request: its record says so rather than claim a redaction."""
    for idx, p in hit:
        # (A policy that failed somewhere keeps its error: that decided the request.)
        if p.effect != "redact" or p.level != CANDIDATE or decided[idx] == "error":
            continue
        on = [i for i, matched in hits.redact_cand.items() if any(q is p for q, _ in matched)]
        if on and set(on).isdisjoint(kept):
            decided[idx] = "not_applicable"
            applied[idx] = ("it matched only candidates that restrict removed", (), ())


def _idle(policies: Sequence[CompiledPolicy], has_cand: bool, has_tools: bool
          ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Each policy's decision and reason when it matched nowhere: not applicable when
    its level has no target (no candidates, no tools)."""
    decisions: list[str] = []
    reasons: list[str] = []
    for p in policies:
        level = p.level
        if level == REQUEST or (level == CANDIDATE and has_cand) or \
                (level == TOOL and has_tools):
            decisions.append(p.idle_decision)
            reasons.append("")
        else:
            decisions.append("not_applicable")
            reasons.append("no candidates" if level == CANDIDATE else "no tools")
    return tuple(decisions), tuple(reasons)


def _applied_decision(spec: PolicySpec, mode: str) -> str:
    word = {"deny": "deny", "allow": "allow", "restrict": "restrict", "redact": "redact",
            "tools": spec.action}[spec.effect]
    return word if mode == "enforce" else f"would_{word}"


def _default_message(spec: PolicySpec) -> str:
    return {
        "deny": f"Request denied by policy {spec.id}",
        "allow": f"Allowed by policy {spec.id}",
        "restrict": f"Model excluded by policy {spec.id}",
        "redact": f"Redaction of {', '.join(spec.data_classes)} required by policy {spec.id}",
        "tools": f"Tool not allowed by policy {spec.id}",
    }[spec.effect]


def _sourced(item: SourcedPolicy | PolicySpec | Mapping[str, Any], source: str
             ) -> SourcedPolicy:
    if isinstance(item, SourcedPolicy):
        return item
    if isinstance(item, PolicySpec):
        return SourcedPolicy(item, source)
    return SourcedPolicy(PolicySpec.model_validate(dict(item)), source)


def _constant_problems(sp: SourcedPolicy, an: analysis.Analysis, program: Any
                       ) -> list[Problem]:
    value = an.constant
    if value is analysis.NO_ATTRIBUTES:
        result = program.eval(policy_env().Activation({})).plain_value()
        if not isinstance(result, bool):
            return [Problem(sp.file, sp.expr_line or sp.line, sp.spec.id,
                            f"reads no attribute and always fails: {evaluation_error(result)}")]
        value = result
    if value is None:
        return []
    meaning = {("deny", True): "denies every request", ("deny", False): "never denies",
               ("allow", True): "allows every request", ("allow", False): "never allows"}
    what = meaning.get((sp.spec.effect, value),
                       "applies to everything" if value else "never applies")
    return [Problem(sp.file, sp.expr_line or sp.line, sp.spec.id,
                    f"expression is constant: always {str(value).lower()} ({what})")]


def _probe_problems(sp: SourcedPolicy, probes: list[tuple[int, str]]) -> list[Problem]:
    """A part of the expression that reads no attribute and fails at load fails every
    evaluation: under on_error deny, the policy would deny every request."""
    env = policy_env()
    out = []
    for offset, text in probes:
        try:
            value = env.compile(text).eval(env.Activation({}))
        except RuntimeError:
            continue  # what the checker took, rewritten, should compile; if not, no verdict
        if value.type() == cel.Type.ERROR:
            # The policy's own constants, not a request's values: shown as CEL says it.
            out.append(_finding_problem(sp, offset, "fails on every evaluation: "
                                        f"{value.plain_value()}", "error"))
    return out


def _bad_regex(pattern: str) -> str | None:
    env, program = _regex_checker()
    value = program.eval(env.Activation({"p": pattern})).plain_value()
    # RE2's text quotes the pattern: the policy's own literal, shown to its author.
    if isinstance(value, bool):
        return None
    return str(value).partition(": ")[2].removeprefix("invalid regular expression: ")[:200]


__all__ = [
    "DEFAULT_DENY_ID",
    "NO_CANDIDATE_ID",
    "QUIET_DECISIONS",
    "CompiledPolicy",
    "Decision",
    "DecisionRecord",
    "DecisionStats",
    "Outcome",
    "PolicySet",
]
