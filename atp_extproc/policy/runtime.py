"""Policies in the running server: built from atp.yaml, swapped whole on reload.

Two ways in, same rules:

- `policy_set_from_config(text, source)`: call it from config.parse so the PolicySet is
  part of the Snapshot; a snapshot that fails (a policy that does not type-check) is
  refused by the existing reload logic, which keeps the old snapshot, hence the old
  policies, and logs why.
- `PolicyStore`: holds the current PolicySet and reloads it from a file on its own
  (for a caller that reloads policies apart from the snapshot).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from atp_extproc.llm_api import OPERATIONS, estimate_tokens, tool_lists
from atp_extproc.policy.attributes import (
    MAX_LIST,
    MAX_STRING,
    allowed_tools_spec,
    build_attributes,
    request_from_body,
    tool_key,
)
from atp_extproc.policy.engine import DecisionStats, PolicySet
from atp_extproc.policy.settings import (
    LoadedPolicies,
    PolicyError,
    Problem,
    SourcedPolicy,
    is_policy_file,
    load_file,
    load_text,
    require_ok,
)
from atp_extproc.redact.settings import BUILTIN_CLASSES

log = logging.getLogger("atp.policy")

AUTH_METHODS = ("api_key", "jwt", "trusted_header", "anonymous")


def data_classes_of(raw: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The data classes an atp.yaml's redaction knows (built-in and its custom
    detectors'); None for a policy file, which says nothing about them."""
    if is_policy_file(raw):
        return None
    section = raw.get("redaction")
    detectors = section.get("custom_detectors") if isinstance(section, dict) else None
    custom = [d.get("name") for d in detectors or () if isinstance(d, dict)]
    return (*BUILTIN_CLASSES, *(str(name) for name in custom if name))


def unknown_classes_alone(policies: Iterable[SourcedPolicy]) -> list[Problem]:
    """The data classes of policy files read without their atp.yaml that are not built
    in. The atp.yaml including them may define them as custom detectors, so a warning,
    not an error: a typo must not pass a team's check and fail the deploy."""
    return [Problem(sp.file, sp.field_lines.get(f"data_classes[{i}]", sp.line), sp.spec.id,
                    f"{dc!r} is not a built-in data class: an error unless the atp.yaml "
                    "that includes this file defines a custom detector of that name",
                    "warning")
            for sp in policies
            for i, dc in enumerate(sp.spec.data_classes) if dc not in BUILTIN_CLASSES]


def known_values(raw: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """Values literals in policies are checked against (warnings, not errors)."""
    models = [m for m in raw.get("models") or () if isinstance(m, dict)]
    routes = [r for r in raw.get("routes") or () if isinstance(r, dict)]
    known: dict[str, frozenset[str]] = {
        "request.operation": frozenset(OPERATIONS.values()),
        "request.path": frozenset(OPERATIONS),
        "subject.auth_method": frozenset(AUTH_METHODS),
        "resource.egress": frozenset({"internal", "external"}),
    }
    if models:
        known["resource.model"] = frozenset(str(m.get("name")) for m in models)
        known["resource.cluster"] = frozenset(str(m.get("cluster")) for m in models)
        known["resource.provider"] = frozenset(
            str(m.get("provider") or m.get("cluster")) for m in models)
        known["resource.region"] = frozenset(str(m.get("region", "unspecified"))
                                             for m in models)
    section = raw.get("redaction")
    classes = data_classes_of(raw)
    if classes is not None and isinstance(section, dict) and \
            isinstance(section.get("disabled_classes"), list):
        # A class redaction does not look for is never in request.data_classes: a
        # policy testing for it can never match ('ipv4' in ... with ipv4 disabled).
        known["request.data_classes{}"] = frozenset(classes) - {
            str(c) for c in section["disabled_classes"]}
    if routes:
        known["context.route"] = frozenset(str(r.get("name")) for r in routes)
        aliases: set[str] = set()
        for r in routes:
            if isinstance(r.get("aliases"), dict):
                aliases |= {str(a) for a in r["aliases"]}
        known["request.alias"] = frozenset(aliases)
    return known


def compile_loaded(loaded: LoadedPolicies, *, stats: DecisionStats | None = None,
                   known_data_classes: Iterable[str] | None = None) -> PolicySet:
    require_ok(loaded)
    source = loaded.files[0] if loaded.files else "<policies>"
    return PolicySet.compile(loaded.policies, loaded.settings, source,
                             known_values=known_values(loaded.raw),
                             known_data_classes=known_data_classes, stats=stats)


def policy_set_from_config(text: str, source: str, *, base_dir: Path | None = None,
                           stats: DecisionStats | None = None,
                           known_data_classes: Iterable[str] | None = None
                           ) -> tuple[PolicySet, LoadedPolicies]:
    """Policies of an atp.yaml text; raises PolicyError (file:line problems)."""
    loaded = load_text(text, source, base_dir=base_dir)
    return compile_loaded(loaded, stats=stats, known_data_classes=known_data_classes), loaded


class PolicyStore:
    """The PolicySet in force. `reload()` swaps it atomically or keeps the old one."""

    def __init__(self, path: str | Path, *, known_data_classes: Iterable[str] | None = None):
        self.path = Path(path)
        self.known_data_classes = known_data_classes
        self.stats = DecisionStats()
        self._lock = threading.Lock()
        loaded = load_file(self.path)
        self._current = compile_loaded(loaded, stats=self.stats,
                                       known_data_classes=known_data_classes)
        self.files = loaded.files
        self.version = loaded.digest
        self.last_problems: tuple[Problem, ...] = ()

    @property
    def current(self) -> PolicySet:
        return self._current

    def reload(self) -> bool:
        """True if a new set is in force; False keeps the old one (see last_problems)."""
        loaded = load_file(self.path)
        if loaded.digest and loaded.digest == self.version:
            return False
        try:
            new = compile_loaded(loaded, stats=self.stats,
                                 known_data_classes=self.known_data_classes)
        except PolicyError as exc:
            self.last_problems = exc.details
            log.error("policy reload refused; keeping version %s", self.version,
                      extra={"record": {"policy_problems": [str(p) for p in exc.details]}})
            return False
        with self._lock:
            self._current = new
            self.files = loaded.files
            self.version = loaded.digest
            self.last_problems = ()
        log.info("policies reloaded", extra={"record": {"policy_version": self.version,
                                                         "policies": len(new.policies)}})
        return True


# -- glue for the exchange ------------------------------------------------------------


def claimed_subject(claims: Any) -> dict[str, Any]:
    """subject.user, groups and roles as a verified token's claims (a Struct, or a
    mapping) give them: `sub`, and the `groups` and `roles` claims (lists, or
    space-separated strings)."""
    plain: Mapping[str, Any] = {}
    if isinstance(claims, struct_pb2.Struct):
        plain = {k: (v.string_value if v.HasField("string_value") else
                     list(islice((x.string_value for x in v.list_value.values
                                  if x.HasField("string_value")), _LISTED))
                     if v.HasField("list_value") else None)
                 for k, v in claims.fields.items() if k in ("sub", "groups", "roles")}
    elif isinstance(claims, Mapping):
        plain = claims
    subject: dict[str, Any] = {"groups": _claim_strings(plain, "groups"),
                               "roles": _claim_strings(plain, "roles")}
    if isinstance(plain.get("sub"), str):
        subject["user"] = plain["sub"]
    return subject


# One more than a list attribute holds: the attribute document then cuts the list and
# names the cut in context.truncated, as it does for any list.
_LISTED = MAX_LIST + 1


def _claim_strings(payload: Mapping[str, Any], key: str) -> list[str]:
    value = payload.get(key)
    if isinstance(value, str):
        # OAuth-style, space-separated: split on spaces alone, or a group named
        # "sales<NBSP>admin" would give its holder "admin".
        return [part for part in value.split(" ") if part]
    if isinstance(value, list):
        return list(islice((v for v in value if isinstance(v, str)), _LISTED))
    return []


def attributes_for_request(*, tenant: str, auth_method: str, key_id: str | None,
                           jwt_payload: Any, path: str, operation: str, alias: str,
                           body_bytes: int, doc: Mapping[str, Any],
                           data_classes: Mapping[str, int] | None = None, route: str = "",
                           environment: str = "", request_id: str = "",
                           config_version: str = "", prompt_chars: int | None = None) -> Any:
    """The attribute document for one exchange, from what the exchange already has.

    jwt_payload: the jwt_authn payload (a google.protobuf.Struct, or a dict) or None;
    `sub` becomes subject.user, `groups`/`roles` become subject.groups/roles.
    doc: the parsed body; data_classes: {class: findings} from redaction's detection;
    prompt_chars: what of the body the model reads as text (token_estimate's base; the
    body's size where not given).
    """
    subject: dict[str, Any] = {"tenant": tenant, "auth_method": auth_method,
                               "key_id": key_id or ""}
    if jwt_payload is not None:
        subject.update(claimed_subject(jwt_payload), claims=jwt_payload)
    request, cut = request_from_body(operation, doc)
    request.update(path=path, alias=alias, body_bytes=body_bytes,
                   token_estimate=estimate_tokens(
                       body_bytes if prompt_chars is None else prompt_chars))
    if data_classes:
        request["data_classes"] = data_classes
    context = {"route": route, "environment": environment, "request_id": request_id,
               "config_version": config_version}
    if cut:
        context["truncated"] = cut
    return build_attributes(subject, request, context)


def strip_tools(doc: Mapping[str, Any], names: Iterable[str],
                key: str = "tools") -> list[Any] | None:
    """The body's `tools` (or its list under `key`, one of llm_api.TOOL_LISTS) without
    `names` (for llm_api.rewrite), or None if unchanged."""
    tools = doc.get(key)
    drop = set(names)
    if not isinstance(tools, list) or not drop:
        return None
    # Matched by the key policies saw, cut to MAX_STRING as attributes cut it (a longer
    # name would never match); an entry that is no mapping was never shown to them, so
    # it is never stripped.
    kept = _without(tools, drop)
    return kept if kept != tools else None


def _without(tools: list[Any], drop: set[str]) -> list[Any]:
    kept = []
    for tool in tools:
        if _named(tool, drop):
            continue
        grouped = tool.get("tools") if isinstance(tool, dict) else None
        if isinstance(grouped, list):  # a namespace: its tools are stripped one by one
            left = _without(grouped, drop)
            if not left:
                continue
            if left != grouped:
                tool = {**tool, "tools": left}
        kept.append(tool)
    return kept


def input_declaring(operation: str, doc: Mapping[str, Any],
                    names: Iterable[str]) -> str | None:
    """Where a Responses input item declares one of `names` (`input[i].tools`), or None.

    Those are past turns' tool lists (tool search results, tools added mid-conversation):
    ATP does not rewrite history, so such a request is refused rather than stripped."""
    drop = set(names)
    for param, tools in tool_lists(operation, doc):
        if param.startswith("input[") and any(_named(t, drop) for t in tools):
            return param
    return None


def _named(tool: Any, names: set[str]) -> bool:
    return isinstance(tool, dict) and tool_key(tool)[:MAX_STRING] in names


def forces_one_of(choice: Any, names: Iterable[str]) -> bool:
    """Whether a tool_choice (or legacy function_call) object forces one of `names`."""
    if not isinstance(choice, dict) or choice.get("type") == "allowed_tools":
        return False
    kind, drop = choice.get("type"), set(names)
    # A forced MCP choice names a tool of the server, while the server's entry in `tools`
    # (what policies strip) has no name and goes by its type.
    return kind in drop if kind == "mcp" else _named(choice, drop)


class ForcedToolStripped(Exception):
    """The request's tool_choice insists on a tool that policy strips."""


def tool_choice_without(choice: Any, names: Iterable[str], tools_left: bool) -> Any:
    """`tool_choice` once the tools `names` are stripped (for llm_api.rewrite): the same
    object when unaffected, an `allowed_tools` choice without them ("none" when none of
    it is left), or None when it must go with the last tool.

    Raises ForcedToolStripped when the client insists on a stripped tool ("required"
    with no tool left, a forced tool, an allowed_tools list of mode "required" left
    empty): no answer could honour that request."""
    drop = set(names)
    if not isinstance(choice, dict):
        if choice == "required" and not tools_left:
            raise ForcedToolStripped
        return choice if tools_left else None
    if choice.get("type") != "allowed_tools":
        if forces_one_of(choice, drop) or not tools_left:
            raise ForcedToolStripped
        return choice
    spec, nested = allowed_tools_spec(choice)
    allowed = spec.get("tools")
    left = [t for t in allowed if not _named(t, drop)] if isinstance(allowed, list) else []
    if left and tools_left:
        if len(left) == len(allowed):
            return choice
        if nested:
            return {**choice, "allowed_tools": {**spec, "tools": left}}
        return {**choice, "tools": left}
    if spec.get("mode") == "required":
        raise ForcedToolStripped
    return "none" if tools_left else None
