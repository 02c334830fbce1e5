"""Refuse Envoy configs that fail open where ATP's policies must hold.

Fail-open (`failure_mode_allow: true`) forwards the original, unredacted body when ATP is
down or slow, so a deny, restrict, tools or redact policy (or redaction itself) silently
stops applying. For every ext_proc filter of every filter chain of every HTTP connection
manager (its http_filters, and an upgrade's own `filters`, which replace them for
websocket or CONNECT requests) this checks the filter's own `failure_mode_allow`,
`disabled`, `observability_mode` (Envoy does not wait for ATP's answer) and
`disable_immediate_response` (Envoy ignores ATP's refusals), and the ExtProcPerRoute
override (`overrides.failure_mode_allow`, `disabled`), bare or inside an
envoy.config.route.v3.FilterConfig (whose own `disabled` also turns it off), that each
route's weighted cluster, route, virtual host and route config hold under the filter's
name. Routes that answer directly (`direct_response`, `redirect`) send nothing upstream
and are skipped. Bools and enums are read as Envoy reads them (proto JSON: "true" and
"yes" are true, "skip" and 2 are SKIP).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Literal

from atp_extproc.config import envoy_buffer_limit
from atp_extproc.exchange import CLUSTER_HEADER
from atp_extproc.llm_api import OPERATIONS
from atp_extproc.policy.settings import Problem, load_yaml

EXT_PROC_TYPE = "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
PER_ROUTE_TYPE = "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
# The generic per-route wrapper: its `disabled` turns any filter off on a route, and any
# entry that is not disabled turns on a filter that is `disabled: true` by default.
FILTER_CONFIG_TYPE = "envoy.config.route.v3.FilterConfig"
# ProcessingMode's enums by number: Envoy takes a number (bare or quoted) as well as a name.
HEADER_MODES = ("DEFAULT", "SEND", "SKIP")
BODY_MODES = ("NONE", "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED",
              "GRPC")
# A quoted bool as Envoy's proto JSON parser reads it (absl::SimpleAtob, any letter case);
# it refuses other words ("on", "off").
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0"})

# (line, path, reason): a problem before the file, severity and `why` are added.
Finding = tuple[int, str, str]
# A filter's per-route entry at one level: (its line, *_override of it).
Level = tuple[int, bool | None, bool, dict | None]


def _line(node: Any, key: Any = None) -> int:
    if key is not None and hasattr(node, "key_lines") and key in node.key_lines:
        return node.key_lines[key]
    return getattr(node, "line", 0)


def _bool(value: Any) -> bool | None:
    """A bool as Envoy reads it: true/false, a quoted word ("true", "False", "yes", "1"),
    or a google.protobuf.BoolValue written as {value: ...}; None if unset."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None
    return None


def _true(value: Any) -> bool:
    return _bool(value) is True


def _enum(value: Any, names: tuple[str, ...]) -> str | None:
    """An enum's name as Envoy reads it: a name in any letter case, or a number (bare or
    quoted); unset (null) is the first."""
    if value is None:
        return names[0]
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return names[value] if 0 <= value < len(names) else None
    return value.upper() if isinstance(value, str) else None


def _typed(http_filter: dict) -> dict:
    typed = http_filter.get("typed_config")
    return typed if isinstance(typed, dict) else {}


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _is_type(node: Any, type_name: str) -> bool:
    return isinstance(node, dict) and str(node.get("@type", "")).endswith(type_name)


def _is_ext_proc(http_filter: dict) -> bool:
    return _is_type(http_filter.get("typed_config"), EXT_PROC_TYPE) or \
        http_filter.get("name") == "envoy.filters.http.ext_proc"


def _per_route(holder: Any, name: str) -> tuple[dict | None, int]:
    """The entry for the filter called `name` in the typed_per_filter_config of a route
    config, virtual host, route or weighted cluster, and its line. Envoy looks entries up
    by the filter's name alone: one under another name never applies, whatever its type,
    so neither its `disabled` nor a fail-closed override there counts."""
    cfg = holder.get("typed_per_filter_config") if isinstance(holder, dict) else None
    entry = cfg.get(name) if isinstance(cfg, dict) else None
    if not isinstance(entry, dict):
        return None, 0
    return entry, _line(cfg, name)


def _override(per_route: dict | None) -> tuple[bool | None, bool, dict | None]:
    """(failure_mode_allow override or None, disabled, processing_mode override or None)
    of a per-route entry, looking inside a FilterConfig wrapper."""
    if per_route is None:
        return None, False, None
    if _is_type(per_route, FILTER_CONFIG_TYPE):
        if _true(per_route.get("disabled")):
            return None, True, None  # the filter is off; its `config` is ignored
        inner = per_route.get("config")
        per_route = inner if isinstance(inner, dict) else {}
    disabled = _true(per_route.get("disabled"))
    overrides = per_route.get("overrides")
    if not isinstance(overrides, dict):
        return None, disabled, None
    mode = overrides.get("processing_mode")
    return (_bool(overrides.get("failure_mode_allow")), disabled,
            mode if isinstance(mode, dict) else None)


def _withheld(mode: dict) -> str | None:
    """What of the request a processing mode keeps from ATP, which needs the headers
    (who asks, where), the whole body (what) and the trailers (where an HTTP/2 client
    may put its key, which ATP removes): None if nothing."""
    if _enum(mode.get("request_header_mode"), HEADER_MODES) == "SKIP":
        return "request_header_mode: SKIP"
    if _enum(mode.get("request_body_mode"), BODY_MODES) == "NONE":
        return "request_body_mode: NONE"
    if _enum(mode.get("request_trailer_mode"), HEADER_MODES) in (None, "DEFAULT", "SKIP"):
        return "request_trailer_mode: SKIP"
    return None


def _partial_body(mode: dict) -> str | None:
    """Why a processing mode hands ATP a request body in pieces, which ATP refuses (500
    atp_partial_body: a body it cannot check whole cannot go), or None."""
    body = _enum(mode.get("request_body_mode"), BODY_MODES)
    if body in ("NONE", "BUFFERED"):
        return None
    return (f"request_body_mode: {body}: a body that reaches Envoy in pieces (a slow "
            "client, any large body) comes to ATP in pieces, which it refuses with a 500 "
            "(atp_partial_body); ATP reads a body whole: BUFFERED")


def _blocked_mutations(rules: Any) -> str | None:
    """What in an ext_proc filter's mutation_rules stops header changes ATP relies on, or
    None (unset, or an error then fails the request: disallow_is_error)."""
    if not isinstance(rules, dict) or _true(rules.get("disallow_is_error")):
        return None
    for key in ("disallow_all", "disallow_system"):  # every header; `:path` among others
        if _true(rules.get(key)):
            return f"{key}: true"
    for key in ("disallow_expression", "allow_expression"):
        if key in rules:
            return f"with {key}"  # may match the headers ATP changes
    return None


def _route_name(vhost: dict, index: int, route: dict) -> str:
    """How a problem names a route: its name, else its place and match (routes often
    differ only in header matchers)."""
    name = route.get("name")
    if name:
        return f"virtual host {vhost.get('name', '?')} route {name}"
    match = route.get("match") if isinstance(route.get("match"), dict) else {}
    keys = ("prefix", "path", "safe_regex", "path_separated_prefix")
    what = next((f"{k}={match[k]}" for k in keys if k in match), "match")
    headers = [h.get("name") for h in match.get("headers") or () if isinstance(h, dict)]
    if headers:
        what += f" with headers {', '.join(map(str, headers))}"
    return f"virtual host {vhost.get('name', '?')} route #{index + 1} ({what})"


def _upgrades(hcm: dict) -> list[tuple[int, dict]]:
    """The upgrades (websocket, CONNECT...) with a filter chain of their own, by index:
    Envoy runs their `filters` instead of http_filters for such requests (an upgrade
    without `filters` runs http_filters)."""
    upgrades = hcm.get("upgrade_configs")
    return [(i, u) for i, u in enumerate(upgrades if isinstance(upgrades, list) else ())
            if isinstance(u, dict) and isinstance(u.get("filters"), list) and u["filters"]]


def _upgrade_on(route: dict, upgrade: dict | None) -> bool:
    """Whether requests may take `route` through `upgrade`'s filters (None: the plain
    chain, always): the route's own upgrade_configs entry for the type decides, else the
    connection manager's `enabled` (both default true; types in any letter case)."""
    if upgrade is None:
        return True
    kind = str(upgrade.get("upgrade_type", "")).lower()
    action = route.get("route") if isinstance(route.get("route"), dict) else {}
    for entry in action.get("upgrade_configs") or ():
        if isinstance(entry, dict) and str(entry.get("upgrade_type", "")).lower() == kind:
            return _bool(entry.get("enabled")) is not False
    return _bool(upgrade.get("enabled")) is not False


def _targets(route: dict, where: str,
             clusters: Collection[str] | None) -> list[tuple[list[dict], str]]:
    """Where a route's per-route configs sit (most specific first) for each way it sends
    requests on: each weighted cluster that may reach a model, whose own
    typed_per_filter_config Envoy reads before the route's, or else the route itself."""
    targets = [([c, route], f"{where} weighted cluster {c.get('name', '?')}"
                if isinstance(c.get("typed_per_filter_config"), dict) else where)
               for c in _weighted(route.get("route")) if _cluster_may_reach(c, clusters)]
    return targets or [([route], where)]


def _levels(f: dict, holders: list[Any]) -> list[Level]:
    """The per-route entries for the ext_proc filter `f` in `holders` (a route's holders
    of per-route configs, most specific first, as Envoy looks them up)."""
    return [(line, *_override(cfg)) for cfg, line in
            (_per_route(holder, str(f.get("name"))) for holder in holders)
            if cfg is not None]


def _disabled(f: dict, levels: list[Level]) -> bool:
    # An entry turns a filter that is `disabled: true` by default on.
    return levels[0][2] if levels else _true(f.get("disabled"))


def _route_mode(levels: list[Level]) -> tuple[int, dict | None]:
    """The processing_mode override that applies to a route and its entry's line, or
    (0, None): the most specific one set, which Envoy takes whole."""
    return next(((line, mode) for line, _, _, mode in levels if mode is not None),
                (0, None))


def _route_findings(checking: list[dict], holders: list[Any], where: str,
                    route_line: int) -> list[Finding]:
    """Findings for one route (or weighted cluster) through the checking ext_proc filters;
    `holders` hold its per-route configs, most specific first, as Envoy looks them up."""
    off: list[int] = []
    on: list[tuple[dict, list[Level]]] = []
    for f in checking:
        levels = _levels(f, holders)
        if _disabled(f, levels):
            off.append(levels[0][0] if levels else _line(f, "disabled"))
        else:
            on.append((f, levels))
    if not on:
        return [(off[0] or route_line, where, "ext_proc is disabled on this route: "
                 "requests skip ATP")]
    found: list[Finding] = []
    for f, levels in on:
        mode_line, mode = _route_mode(levels)
        # Envoy takes a route's processing_mode whole: what it leaves unset is the
        # default (request_body_mode NONE), not the filter's setting.
        withheld = _withheld(mode) if mode is not None else None
        if withheld is not None:
            found.append((mode_line, where, f"a processing_mode override ({withheld}) "
                          "sends the request upstream without ATP reading it"))
        partial = _partial_body(mode) if mode is not None else None
        if partial is not None:
            found.append((mode_line, where, f"a processing_mode override: {partial}"))
        # ext_proc merges its per-route overrides: the most specific one set wins.
        typed = _typed(f)
        fma, line = next(((fma, line) for line, fma, _, _ in levels if fma is not None),
                         (_true(typed.get("failure_mode_allow")),
                          _line(typed, "failure_mode_allow")))
        if fma:
            found.append((line, where, "ext_proc fails open (failure_mode_allow: true): "
                          "when ATP is down the original, unredacted request goes upstream"))
    return found


def _suffix(upgrade: dict | None) -> str:
    """What a problem's path adds for `upgrade`'s filter chain (None: http_filters)."""
    return f" ({upgrade.get('upgrade_type', '?')} upgrade)" if upgrade is not None else ""


def _routes(hcm: dict, upgrade: dict | None,
            clusters: Collection[str] | None) -> Iterator[tuple[list[Any], str, int]]:
    """Each way a route of a connection manager's own route_config that may reach one of
    `clusters` through `upgrade`'s filters sends requests on (_targets): the holders of
    its per-route configs (most specific first), how a problem names it, its line."""
    route_config = hcm.get("route_config")
    vhosts = route_config.get("virtual_hosts") if isinstance(route_config, dict) else None
    for vhost in vhosts if isinstance(vhosts, list) else ():
        if not isinstance(vhost, dict):
            continue
        for index, route in enumerate(vhost.get("routes") or ()):
            if not isinstance(route, dict) or not _route_may_reach(route, clusters) \
                    or not _upgrade_on(route, upgrade):
                continue
            where = _route_name(vhost, index, route) + _suffix(upgrade)
            for holders, path in _targets(route, where, clusters):
                yield [*holders, vhost, route_config], path, _line(route)


def _chain_findings(hcm: dict, ext: list[dict], upgrade: dict | None,
                    clusters: Collection[str] | None) -> list[Finding]:
    """What lets requests past the ext_proc filters `ext` of one filter chain of a
    connection manager (http_filters, or `upgrade`'s filters) unchecked."""
    suffix = _suffix(upgrade)
    # In observability mode Envoy sends ATP a copy and goes on without waiting for (or
    # applying) its answer: a fine observer beside a checking filter, no check alone.
    checking = [f for f in ext if not _true(_typed(f).get("observability_mode"))]
    if not checking:
        return [(_line(_typed(ext[0]), "observability_mode"), "ext_proc" + suffix,
                 "observability_mode: true: Envoy does not wait for ATP's answer, so no "
                 "deny and no redaction applies: requests go upstream as sent")]
    found: list[Finding] = []
    for f in checking:
        typed = _typed(f)
        mode = typed.get("processing_mode")
        withheld = _withheld(mode if isinstance(mode, dict) else {})
        if withheld is not None:
            found.append((_line(typed, "processing_mode") or _line(f), "ext_proc" + suffix,
                          f"processing_mode {withheld} (the default where unset): requests "
                          "go upstream without ATP reading them"))
        partial = _partial_body(mode if isinstance(mode, dict) else {})
        if partial is not None:
            found.append((_line(typed, "processing_mode") or _line(f), "ext_proc" + suffix,
                          f"processing_mode {partial}"))
        if _true(typed.get("disable_immediate_response")):
            # ATP refuses (deny, oversize, an error) with an immediate response.
            found.append((_line(typed, "disable_immediate_response"), "ext_proc" + suffix,
                          "disable_immediate_response: true: Envoy ignores ATP's refusals "
                          "and sends the request upstream"))
        blocked = _blocked_mutations(typed.get("mutation_rules"))
        if blocked is not None:
            found.append((_line(typed, "mutation_rules"), "ext_proc" + suffix,
                          f"mutation_rules {blocked}: Envoy drops header changes ATP makes "
                          "(removing the client's API key, dropping the query string from "
                          ":path), so they reach the provider"))
    route_config = hcm.get("route_config")
    vhosts = route_config.get("virtual_hosts") if isinstance(route_config, dict) else None
    if not isinstance(vhosts, list):
        # Routes come from elsewhere (RDS): only the filters themselves can be judged.
        if all(_true(f.get("disabled")) for f in checking):
            found.append((_line(checking[0], "disabled"), "ext_proc" + suffix,
                          "disabled: true turns ext_proc off unless a route turns it on"))
        found += [(_line(_typed(f), "failure_mode_allow"), "ext_proc" + suffix,
                   "failure_mode_allow: true fails open") for f in checking
                  if _true(_typed(f).get("failure_mode_allow"))]
        return found
    for holders, where, route_line in _routes(hcm, upgrade, clusters):
        found += _route_findings(checking, holders, where, route_line)
    return found


def fail_open_problems(file: str, text: str, why: list[str],
                       model_clusters: Collection[str] | None = None) -> list[Problem]:
    """Problems for ext_proc that fails open, or is missing where requests may reach a
    model's cluster (`model_clusters`, from atp.yaml; None: any cluster); errors when
    `why` (reasons ATP's decisions must hold) is not empty, warnings otherwise."""
    doc, problems = load_yaml(text, file, envoy=True)
    if doc is None:
        # An empty file (a render or envsubst that failed), which Envoy refuses, was OK.
        return problems or [Problem(file, 1, "", "no Envoy config: the file is empty")]
    severity: Literal["error", "warning"] = "error" if why else "warning"
    because = f" while {'; '.join(why)}" if why else ""
    asked = False
    found: list[Finding] = []
    for hcm, index, upgrade, chain in _chains(doc):
        ext = [f for f in chain if isinstance(f, dict) and _is_ext_proc(f)]
        if ext:
            asked = True
            found += _chain_findings(hcm, ext, upgrade, model_clusters)
        elif _is_connection_manager(hcm) and _may_reach(hcm, model_clusters, upgrade):
            # Another listener's (or chain's) ext_proc does not cover this one.
            asked = True
            stat = hcm.get("stat_prefix", "?")
            found.append(
                (_line(hcm, "http_filters"), "http_filters",
                 f"no ext_proc filter: requests to this connection manager ({stat}) "
                 "may reach a model's cluster unchecked by ATP") if upgrade is None else
                (_line(upgrade, "filters"), f"upgrade_configs[{index}]",
                 f"no ext_proc filter in the filters of the "
                 f"{upgrade.get('upgrade_type', '?')} upgrade (they replace "
                 f"http_filters for it): such requests to this connection manager "
                 f"({stat}) may reach a model's cluster unchecked by ATP"))
    seen: set[Finding] = set()
    for finding in found:
        if finding not in seen:
            seen.add(finding)
            line, path, reason = finding
            problems.append(Problem(file, line, path, reason + because, severity))
    for proxy in _walk(doc):
        if _is_type(proxy, TCP_PROXY_TYPE) and _tcp_reaches(proxy, model_clusters):
            asked = True  # said here, more precisely than "no ext_proc filter"
            problems.append(Problem(
                file, _line(proxy), "tcp_proxy",
                f"a tcp_proxy to a model's cluster ({proxy.get('stat_prefix', '?')}) "
                f"passes requests on unread by ATP{because}", severity))
    if not asked:
        # A config that never asks ATP sends every request on unchecked (an egress proxy
        # placed after ATP has none, but it is not the config ATP is checked against).
        problems.append(Problem(file, 1, "http_filters",
                                f"no ext_proc filter: no request is ever checked by ATP"
                                f"{because}", severity))
    return problems


def answer_problems(file: str, text: str,
                    model_clusters: Collection[str] | None = None) -> list[Problem]:
    """Warnings, whatever the policies (requests still reach ATP), for answers that go
    astray: a route that may reach a model's cluster (`model_clusters`; None: any) whose
    processing mode keeps its answers from ATP, and an ext_proc filter on a listener
    clients reach whose own mode sends answers to ATP: a request Envoy's codec refuses
    reaches no route, so the filter's mode applies to its local reply, and Envoy 1.40
    closes the connection without sending it."""
    doc, _ = load_yaml(text, file, envoy=True)  # (a YAML error is fail_open_problems' to report)
    if doc is None:
        return []
    # An internal listener's requests come from Envoy itself, never refused by its codec.
    internal = {id(node) for listener in _walk(doc) if "internal_listener" in listener
                for node in _walk(listener)}
    found: list[Finding] = []
    for hcm, _, upgrade, chain in _chains(doc):
        # An observer gets copies: Envoy neither waits for it nor applies its answers.
        checking = [f for f in chain if isinstance(f, dict) and _is_ext_proc(f)
                    and not _true(_typed(f).get("observability_mode"))]
        for f in checking:
            typed = _typed(f)
            # A filter disabled by default is in no chain until a route turns it on.
            if upgrade is None and _is_connection_manager(hcm) and id(hcm) not in internal \
                    and not _true(f.get("disabled")) \
                    and not _skips_answers(typed.get("processing_mode")):
                found.append((_line(typed, "processing_mode") or _line(f), "ext_proc",
                              "processing_mode sends response headers (response_header_mode"
                              " SEND, the default where unset): Envoy 1.40 closes the "
                              "connection without an answer to a request its HTTP/1 codec "
                              "refuses (HTTP/1.0, too many headers, a bad header line); set "
                              "SKIP here and SEND in each virtual host's per-route override "
                              "(as envoy/front-proxy.yaml does)"))
        for holders, where, route_line in _routes(hcm, upgrade, model_clusters):
            for f in checking:
                levels = _levels(f, holders)
                if _disabled(f, levels):
                    continue  # said by fail_open_problems: the request skips ATP too
                line, mode = _route_mode(levels)
                source = "its processing_mode override"
                if mode is None:
                    typed = _typed(f)
                    line, mode = _line(typed, "processing_mode"), typed.get("processing_mode")
                    source = "the filter's own processing_mode, which no override replaces"
                if _skips_answers(mode):
                    found.append((line or route_line, where, "ATP never sees this route's "
                                  f"answers (response_header_mode: SKIP, by {source}): no "
                                  "usage or cost is recorded, placeholders are not restored,"
                                  " and the usage chunk ATP adds to streams reaches clients"))
    return [Problem(file, line, path, reason, "warning")
            for line, path, reason in dict.fromkeys(found)]


def _skips_answers(mode: Any) -> bool:
    """Whether a processing mode keeps answers from ATP: it sees none without their
    headers, as only in its answer to them can it ask for the body (allow_mode_override)."""
    return isinstance(mode, dict) and \
        _enum(mode.get("response_header_mode"), HEADER_MODES) == "SKIP"


def _chains(doc: Any) -> Iterator[tuple[dict, int | None, dict | None, list]]:
    """Each HTTP filter chain in `doc`: its holder (a connection manager, or a cluster's
    upstream protocol options), the index and config of the upgrade whose `filters` it is
    (None: http_filters), and its filters."""
    for hcm in _walk(doc):
        filters = hcm.get("http_filters")
        if isinstance(filters, list):
            yield hcm, None, None, filters
            for index, upgrade in _upgrades(hcm):
                yield hcm, index, upgrade, upgrade["filters"]


TCP_PROXY_TYPE = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def _tcp_reaches(proxy: dict, clusters: Collection[str] | None) -> bool:
    return clusters is None or any(name in clusters for name in _named_clusters(proxy))


def _weighted(action: Any) -> list[dict]:
    """The entries of a route action's (or a tcp_proxy's) weighted_clusters."""
    weighted = action.get("weighted_clusters") if isinstance(action, dict) else None
    entries = weighted.get("clusters") if isinstance(weighted, dict) else None
    return [c for c in entries if isinstance(c, dict)] if isinstance(entries, list) else []


def _named_clusters(action: dict) -> list[Any]:
    """The clusters a route action or a tcp_proxy names: `cluster`, `weighted_clusters`."""
    return [action.get("cluster")] + [c.get("name") for c in _weighted(action)]


def _cluster_may_reach(entry: dict, clusters: Collection[str] | None) -> bool:
    """Whether a weighted cluster may be one of `clusters` (None: any)."""
    return clusters is None or entry.get("name") in clusters or "cluster_header" in entry


def _is_connection_manager(node: dict) -> bool:
    # A cluster's upstream filters (HttpProtocolOptions) are http_filters too.
    return any(key in node for key in ("route_config", "rds", "scoped_routes"))


def _may_reach(hcm: dict, clusters: Collection[str] | None,
               upgrade: dict | None = None) -> bool:
    """Whether a connection manager may send requests (through `upgrade`'s filters) to
    one of `clusters` (None: to any): routes it gets from elsewhere (RDS), or one that
    may (_route_may_reach, _upgrade_on)."""
    route_config = hcm.get("route_config")
    if not isinstance(route_config, dict):
        return True
    return any(isinstance(route, dict) and _route_may_reach(route, clusters)
               and _upgrade_on(route, upgrade)
               for vhost in route_config.get("virtual_hosts") or ()
               if isinstance(vhost, dict) for route in vhost.get("routes") or ())


def _route_may_reach(route: dict, clusters: Collection[str] | None) -> bool:
    """Whether a route may send requests to one of `clusters` (None: to any upstream):
    it names such a cluster, or reads its cluster from a header or a plugin. A direct
    response or a redirect sends nothing upstream."""
    action = route.get("route")
    if not isinstance(action, dict):
        return False
    if clusters is None or "cluster_header" in action or "cluster_specifier_plugin" in action:
        return True
    return action.get("cluster") in clusters or any(
        _cluster_may_reach(c, clusters) for c in _weighted(action))


JWT_AUTHN_TYPE = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"


def jwt_problems(file: str, text: str, namespace: str, payload_key: str) -> list[Problem]:
    """Where a jwt_authn filter's claims would never reach ATP (auth.jwt): a provider
    that writes them under another key than `payload_key` (or not at all), a jwt_authn
    filter after ext_proc, or an ext_proc filter that does not forward `namespace`.
    Every token would then be ignored: its caller refused, or served as anonymous."""
    doc, _ = load_yaml(text, file, envoy=True)  # (a YAML error is fail_open_problems' to report)
    problems: list[Problem] = []
    if doc is None:
        return problems
    for hcm in _walk(doc):
        filters = hcm.get("http_filters")
        if not isinstance(filters, list):
            continue
        order = [("jwt" if _is_type(f.get("typed_config"), JWT_AUTHN_TYPE) else
                  "ext_proc" if _is_ext_proc(f) else "", f)
                 for f in filters if isinstance(f, dict)]
        jwt = [f for kind, f in order if kind == "jwt"]
        ext = [f for kind, f in order if kind == "ext_proc"]
        if not jwt or not ext:
            continue
        first_ext = next(i for i, (kind, _) in enumerate(order) if kind == "ext_proc")
        for i, (kind, f) in enumerate(order):
            if kind == "jwt" and i > first_ext:
                problems.append(Problem(file, _line(f), "jwt_authn", "jwt_authn comes after "
                                        "ext_proc: ATP never sees the token's claims"))
        for f in jwt:
            providers = f["typed_config"].get("providers")
            for name, provider in (providers.items() if isinstance(providers, dict) else ()):
                given = provider.get("payload_in_metadata") if isinstance(provider, dict) \
                    else None
                if given != payload_key:
                    problems.append(Problem(
                        file, _line(providers, name), f"jwt_authn provider {name}",
                        f"payload_in_metadata is {given!r}, but auth.jwt.payload_key is "
                        f"{payload_key!r}: ATP never sees this provider's claims"))
        for f in ext:
            typed = f.get("typed_config") if isinstance(f.get("typed_config"), dict) else {}
            options = typed.get("metadata_options")
            spaces = options.get("forwarding_namespaces") if isinstance(options, dict) else None
            untyped = spaces.get("untyped") if isinstance(spaces, dict) else None
            if not isinstance(untyped, list) or namespace not in untyped:
                problems.append(Problem(
                    file, _line(f), "ext_proc",
                    f"metadata_options.forwarding_namespaces.untyped lacks {namespace} "
                    "(auth.jwt.metadata_namespace): ATP never sees the token's claims"))
    return problems


def missing_cluster_problems(file: str, text: str,
                             model_clusters: Collection[str]) -> list[Problem]:
    """atp.yaml's model clusters that the Envoy config does not define: Envoy answers
    every request ATP routes there 503 cluster_not_found."""
    doc, _ = load_yaml(text, file, envoy=True)  # (a YAML error is fail_open_problems' to report)
    if not isinstance(doc, dict) or "cds_config" in str(doc.get("dynamic_resources")):
        return []  # clusters that come from a control plane cannot be read here
    static = doc.get("static_resources")
    clusters = static.get("clusters") if isinstance(static, dict) else None
    names = {c.get("name") for c in clusters or () if isinstance(c, dict)}
    line = _line(static, "clusters") if isinstance(static, dict) else 1
    problems = [Problem(file, line, "static_resources.clusters",
                        f"no cluster {name!r}, which a model in atp.yaml routes to: Envoy "
                        "would answer its requests 503 cluster_not_found")
                for name in sorted(set(model_clusters) - names)]
    # The listeners ATP checks: their routes are the ones ATP's choice must reach.
    checked = _checked_listeners(static)
    routed = _routed_clusters(checked, clusters)
    if routed is not None:
        problems += [Problem(file, line, "static_resources.listeners",
                             f"no route of a listener ATP checks sends requests to cluster "
                             f"{name!r}, which a model in atp.yaml routes to: Envoy would "
                             "answer them from its fallback route")
                     for name in sorted((set(model_clusters) & names) - routed)]
        if len(set(model_clusters) & names) > 1 and not _matches_atp_cluster(checked):
            problems.append(Problem(
                file, line, "static_resources.listeners",
                f"no route of a listener ATP checks reads {CLUSTER_HEADER} (by "
                "cluster_header or a header match): Envoy would send each request where "
                "its Host or path says, not to the model's cluster ATP chose, with that "
                "model's id and under its policies"))
    problems += [Problem(file, where or line, path, reason, severity)
                 for where, path, reason, severity in _misrouted(checked, set(model_clusters),
                                                                 clusters)]
    return problems


def _misrouted(listeners: list[dict[str, Any]], model_clusters: set[str], clusters: Any
               ) -> list[tuple[int, str, str, Literal["error", "warning"]]]:
    """Routes that send a request ATP tagged for one model's cluster elsewhere: one whose
    x-atp-cluster condition takes that cluster's name (no earlier route of its virtual
    host taking it) and names another cluster (not an aggregate of it), and one that,
    ahead of the routes of its virtual host reading x-atp-cluster, takes the API's paths
    whatever it says (a warning where it may: its path cannot be read here, or a header
    the client sends decides). ATP's record (model, cluster, cost) and its policies
    would be another's."""
    members = _aggregates(clusters)
    out: list[tuple[int, str, str, Literal["error", "warning"]]] = []
    for listener in listeners:
        for host in _walk(listener):
            routes = host.get("routes")
            if "domains" not in host or not isinstance(routes, list):
                continue
            read = False
            # Per API path, the clusters routes ahead took: none of those reach later ones.
            claimed: dict[str, set[str]] = {api: set() for api in OPERATIONS}
            # Said if a later route reads the header.
            ahead: list[tuple[int, str, str, Literal["error", "warning"]]] = []
            for k, entry in enumerate(routes):
                where = (_line(entry), f"virtual host {host.get('name')} route #{k}")
                match = entry.get("match") if isinstance(entry, dict) else None
                route = entry.get("route") if isinstance(entry, dict) else None
                if not isinstance(match, dict) or match.get("query_parameters"):
                    continue  # (ATP sends the path alone: no query matches a request)
                target = route.get("cluster") if isinstance(route, dict) else None
                condition = _atp_cluster_condition(match)
                paths = _api_paths(match)
                if condition is not None:
                    met = {c for c in model_clusters if condition[1](c)}
                    # A path unread here may take any API path, and takes none for sure.
                    reach = list(OPERATIONS) if paths is None else paths
                    wrong = sorted(c for c in met if c != target
                                   and c not in members.get(str(target), ())
                                   and any(c not in claimed[p] for p in reach))
                    if isinstance(target, str) and wrong:
                        out.append((*where, f"the route matching {CLUSTER_HEADER}"
                                    f"{condition[0]} sends to cluster {target!r}: a model ATP "
                                    f"routes to {', '.join(map(repr, wrong))} would be served "
                                    f"by {target!r}", "error"))
                    if _takes_every_api_request(match):
                        for p in paths or ():
                            claimed[p] |= met
                if condition is not None or (isinstance(route, dict) and str(
                        route.get("cluster_header", "")).lower() == CLUSTER_HEADER):
                    out += ahead if not read else []
                    read = True
                elif not read and isinstance(target, str) and \
                        not _UNKNOWABLE.intersection(match) and \
                        (taken := _taken_ahead(match, paths, target)) is not None:
                    ahead.append((*where, f"a route to cluster {target!r} comes before the "
                                  f"routes reading {CLUSTER_HEADER} and {taken[0]}", taken[1]))
    return out


def _taken_ahead(match: dict[str, Any], paths: list[str] | None, target: str
                 ) -> tuple[str, Literal["error", "warning"]] | None:
    """What a route to `target` ahead of those reading x-atp-cluster takes of the API's
    requests (`paths`: its API paths, None where unread here), and how sure that is: a
    warning where its path may not be the API's, or a header the client sends decides;
    None where it takes none."""
    headers = _header_conditions(match)
    if headers is None or paths == []:
        return None
    taken = f"takes {paths[0]}" if paths else \
        "may take the API's paths (a path ATP cannot read)"
    if headers:
        return (f"{taken} with header {', '.join(headers)} whatever ATP chose: a client "
                f"that sends it reaches {target!r}, not the model's cluster ATP chose",
                "warning")
    return (f"{taken} whatever ATP chose: those requests never reach the model's cluster",
            "error" if paths else "warning")


# Route match conditions this check cannot judge for an API request (gRPC's takes none).
_UNKNOWABLE = frozenset({"grpc", "dynamic_metadata", "filter_state"})
# ... and those that leave some API requests to the routes after.
_SOMETIMES = _UNKNOWABLE | {"runtime_fraction", "tls_context"}


def _takes_every_api_request(match: dict[str, Any]) -> bool:
    """Whether a route match asks nothing of an API request on its paths but its
    x-atp-cluster condition (a method condition that POST meets aside)."""
    return not _SOMETIMES.intersection(match) and _header_conditions(match) == []


def _header_conditions(match: dict[str, Any]) -> list[str] | None:
    """The wordings of a route match's header conditions an API request may or may not
    meet (its x-atp-cluster condition and a method condition that POST meets aside);
    None where none meets them (a method condition that POST does not meet)."""
    said = []
    for header in match.get("headers") or ():
        name = str(header.get("name", "")) if isinstance(header, dict) else ""
        if not name or name.lower() == CLUSTER_HEADER:
            continue  # (a matcher without a name Envoy refuses)
        wording, meets = _header_condition(header)
        if name.lower() != ":method":
            said.append(name + wording)
        elif not meets("POST"):
            return None
    return said


def _atp_cluster_condition(
        match: dict[str, Any]) -> tuple[str, Callable[[str], bool]] | None:
    """A route match's condition on x-atp-cluster, as Envoy's HeaderMatcher reads it:
    its wording and whether a value meets it. None: no condition on it."""
    header = next((h for h in match.get("headers") or () if isinstance(h, dict)
                   and str(h.get("name", "")).lower() == CLUSTER_HEADER), None)
    return None if header is None else _header_condition(header)


def _header_condition(header: dict[str, Any]) -> tuple[str, Callable[[str], bool]]:
    """An Envoy HeaderMatcher's wording and whether a value meets it."""
    given = header.get("string_match")
    if not isinstance(given, dict):  # the matchers before string_match
        given = {kind: header[f"{kind}_match"] for kind in ("exact", "prefix", "suffix",
                                                            "contains")
                 if f"{kind}_match" in header}
        if isinstance(header.get("safe_regex_match"), dict):
            given["safe_regex"] = header["safe_regex_match"]
    if not given and isinstance(header.get("range_match"), dict):
        # A name is no number: it meets no range, and an inverted one takes it.
        return (" (not a number range)", _every) if header.get("invert_match") else \
            (" (a number range)", _nothing)
    if not given and header.keys() - _PRESENCE_KEYS:
        return " (a condition ATP cannot read)", _nothing
    wording, meets = _string_condition(given)
    if meets is None:  # nor, inverted, every value
        return wording, _nothing
    if "present_match" in header and not given:
        present = header["present_match"] is not False
        wording, meets = (" (present)" if present else " (absent)"), (lambda _: present)
    if header.get("invert_match"):
        return f" (not{wording})", lambda value: not meets(value)
    return wording, meets


# A header matcher's keys that ask for the header's presence only.
_PRESENCE_KEYS = frozenset({"name", "present_match", "invert_match",
                            "treat_missing_header_as_empty"})


def _nothing(_: str) -> bool:
    return False


def _every(_: str) -> bool:
    return True


def _string_condition(given: dict[str, Any]) -> tuple[str, Callable[[str], bool] | None]:
    """An Envoy StringMatcher's wording and test; None for one ATP cannot read."""
    fold = _fold(given.get("ignore_case") is True)
    regex = given.get("safe_regex")
    if isinstance(regex, dict):
        compiled = _compiled(regex.get("regex"))
        wording = f" (regex {regex.get('regex')!r})"
        if compiled is None:
            return wording, None
        return wording, lambda v: compiled.fullmatch(v) is not None
    for kind, test in (("exact", str.__eq__), ("prefix", str.startswith),
                       ("suffix", str.endswith), ("contains", str.__contains__)):
        want = given.get(kind)
        if isinstance(want, str):
            wording = f": {want}" if kind == "exact" else f" ({kind} {want!r})"
            return wording, lambda v, want=want, test=test: test(fold(v), fold(want))
    if given:
        return " (a condition ATP cannot read)", None
    return " (present)", lambda _: True  # a header name alone asks only that it be there


def _fold(ignore_case: bool) -> Callable[[str], str]:
    return str.lower if ignore_case else str


def _compiled(regex: Any) -> re.Pattern[str] | None:
    """Envoy's RE2 pattern as Python's re reads it; None where re cannot, or would read
    it otherwise (RE2's POSIX classes, `[[:alpha:]]`, are a nested set to re)."""
    if not isinstance(regex, str):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        try:
            return re.compile(regex)
        except (re.error, FutureWarning):
            return None


def _api_paths(match: dict[str, Any]) -> list[str] | None:
    """The API paths a route match's prefix, path or regex takes (its other conditions
    aside); None where its path condition cannot be read here (a URI template, a regex
    re reads otherwise)."""
    fold = _fold(match.get("case_sensitive") is False)
    prefix, path = match.get("prefix"), match.get("path")
    separated = match.get("path_separated_prefix")
    regex = match.get("safe_regex")
    compiled = _compiled(regex.get("regex")) if isinstance(regex, dict) else None
    if isinstance(match.get("path_match_policy"), dict) or (
            isinstance(regex, dict) and compiled is None):
        return None
    return [api for api in OPERATIONS
            if (isinstance(prefix, str) and fold(api).startswith(fold(prefix)))
            or (isinstance(path, str) and fold(path) == fold(api))
            or (isinstance(separated, str) and (fold(api) == fold(separated) or
                                                fold(api).startswith(fold(separated) + "/")))
            or (compiled is not None and compiled.fullmatch(api))]


def _checked_listeners(static: Any) -> list[dict[str, Any]]:
    """The static listeners with an ext_proc filter: those whose routes ATP checks."""
    listeners = static.get("listeners") if isinstance(static, dict) else None
    return [listener for listener in listeners if isinstance(listener, dict)
            and any(_is_ext_proc(f) for f in _walk(listener))] \
        if isinstance(listeners, list) else []


def _matches_atp_cluster(listeners: list[dict[str, Any]]) -> bool:
    """Whether a route of `listeners` matches on ATP's cluster header: in a route's
    `match.headers`, or as a virtual host's matcher tree's header input."""
    for listener in listeners:
        for node in _walk(listener):
            match = node.get("match")
            headers = match.get("headers") if isinstance(match, dict) else None
            if isinstance(headers, list) and any(
                    isinstance(h, dict) and str(h.get("name", "")).lower() == CLUSTER_HEADER
                    for h in headers):
                return True
            # (A hash policy or a retry names the header too, without routing by it.)
            if str(node.get("@type", "")).endswith(".HttpRequestHeaderMatchInput") and \
                    str(node.get("header_name", "")).lower() == CLUSTER_HEADER:
                return True
    return False


def _routed_clusters(listeners: list[dict[str, Any]], clusters: Any) -> set[str] | None:
    """The clusters the routes of `listeners` send requests to (an aggregate cluster's
    members too), or None when that cannot be read here: a route picks its cluster from
    a header (x-atp-cluster) or a plugin, or routes come from RDS."""
    routed: set[str] = set()
    for listener in listeners:
        for node in _walk(listener):
            if "rds" in node or "scoped_routes" in node:
                return None
            route = node.get("route")
            if not isinstance(route, dict):
                continue
            weighted = route.get("weighted_clusters")
            targets = [route, *(weighted.get("clusters") or () if isinstance(weighted, dict)
                                else ())]
            for target in targets:
                if not isinstance(target, dict) or _PICKED_ELSEWHERE & target.keys():
                    return None
                routed.add(target.get("cluster") if target is route else target.get("name"))
    for name, members in _aggregates(clusters).items():
        if name in routed:
            routed.update(members)
    return routed


def _aggregates(clusters: Any) -> dict[str, set[str]]:
    """Each aggregate cluster's name → the clusters it sends its requests on to."""
    out: dict[str, set[str]] = {}
    for cluster in clusters if isinstance(clusters, list) else ():
        members = next((node["clusters"] for node in _walk(cluster.get("cluster_type"))
                        if isinstance(node.get("clusters"), list)), None) \
            if isinstance(cluster, dict) else None
        if members:
            out[str(cluster.get("name"))] = {m for m in members if isinstance(m, str)}
    return out


# Route keys that pick the cluster per request, which no config read can follow.
_PICKED_ELSEWHERE = frozenset({"cluster_header", "cluster_specifier_plugin",
                               "inline_cluster_specifier_plugin"})


# Envoy's per_connection_buffer_limit_bytes where a listener does not set it.
ENVOY_DEFAULT_BUFFER_BYTES = 1024 * 1024


def buffer_problems(file: str, text: str, max_body_bytes: int) -> list[Problem]:
    """Listeners with an ext_proc filter that buffer less than ATP assumes for atp.yaml's
    max_body_bytes (config.envoy_buffer_limit): at or below max_body_bytes, Envoy refuses
    bodies ATP would take with its own 413 and answers 500 for an answer ATP asks it to
    buffer; below the assumed buffer, a body placeholders grow past it gets Envoy's 413,
    not ATP's."""
    needed = envoy_buffer_limit(max_body_bytes)
    doc, _ = load_yaml(text, file, envoy=True)  # (a YAML error is fail_open_problems' to report)
    static = doc.get("static_resources") if isinstance(doc, dict) else None
    listeners = static.get("listeners") if isinstance(static, dict) else None
    problems = []
    for i, listener in enumerate(listeners if isinstance(listeners, list) else ()):
        if not isinstance(listener, dict) or not any(
                _is_ext_proc(f) for f in _walk(listener.get("filter_chains"))):
            continue
        limit = _uint(listener.get("per_connection_buffer_limit_bytes",
                                   ENVOY_DEFAULT_BUFFER_BYTES))
        if limit is not None and limit < needed:
            problems.append(Problem(
                file, _line(listener, "per_connection_buffer_limit_bytes") or _line(listener),
                f"static_resources.listeners[{i}].per_connection_buffer_limit_bytes",
                f"Envoy buffers {limit} bytes; with server.max_body_bytes {max_body_bytes} "
                f"ATP counts on {needed} (twice max_body_bytes, at least 8 MiB): bodies "
                "near the limit, or grown by placeholders, would get Envoy's 413 and "
                "answers ATP asks it to buffer its 500"))
    return problems


def _uint(value: Any) -> int | None:
    """An integer as Envoy's proto JSON reads it: bare, quoted ("65536", "1e5") or a
    wrapper's {value: ...}; None where it is none."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


# Envoy's circuit breaker limits where a cluster's threshold leaves them unset.
ENVOY_DEFAULT_LIMITS = {"max_requests": 1024, "max_pending_requests": 1024, "max_retries": 3}
PRIORITIES = ("DEFAULT", "HIGH")


def _limit(cluster: dict[str, Any], key: str,
           priority: str = "DEFAULT") -> tuple[int | None, str]:
    """A cluster's circuit breaker limit `key` for a routing priority (in the first
    threshold for it, as Envoy reads them) and its wording; None where it cannot be read
    here, or a retry budget replaces max_retries."""
    breakers = cluster.get("circuit_breakers")
    thresholds = breakers.get("thresholds") if isinstance(breakers, dict) else None
    threshold = next((t for t in thresholds if isinstance(t, dict)
                      and _enum(t.get("priority"), PRIORITIES) == priority), {}) \
        if isinstance(thresholds, list) else {}
    if key == "max_retries" and "retry_budget" in threshold:
        return None, ""
    if key not in threshold:
        return ENVOY_DEFAULT_LIMITS[key], f"{key} {ENVOY_DEFAULT_LIMITS[key]} (Envoy's default)"
    limit = _uint(threshold[key])
    return limit, f"{key} {limit}"


def _retries(policy: Any) -> bool:
    """Whether a route's retry policy retries: something to retry on, and num_retries
    (1 where unset) above 0."""
    if not isinstance(policy, dict) or not str(policy.get("retry_on") or "").strip():
        return False
    tries = _uint(policy.get("num_retries", 1))
    return tries is None or tries > 0


def _grpc_cluster(ext_proc: dict[str, Any]) -> Any:
    """The cluster an ext_proc filter's gRPC service names (envoy_grpc), or None."""
    service = _typed(ext_proc).get("grpc_service")
    grpc = service.get("envoy_grpc") if isinstance(service, dict) else None
    return grpc.get("cluster_name") if isinstance(grpc, dict) else None


def capacity_problems(file: str, text: str,
                      model_clusters: Collection[str] | None = None) -> list[Problem]:
    """Warnings for circuit breakers LLM traffic outgrows at Envoy's defaults: ATP's
    ext_proc cluster's (_stream_limits) and those of a cluster a model route retries
    onto (_retry_limits), at the cluster, where the fix goes."""
    doc, _ = load_yaml(text, file, envoy=True)  # (a YAML error is fail_open_problems' to report)
    static = doc.get("static_resources") if isinstance(doc, dict) else None
    listed = static.get("clusters") if isinstance(static, dict) else None
    clusters = {c["name"]: (i, c) for i, c in enumerate(listed if isinstance(listed, list)
                                                       else ())
                if isinstance(c, dict) and isinstance(c.get("name"), str)}
    found = [*_stream_limits(doc, clusters),
             *_retry_limits(static, clusters, model_clusters)]
    return [Problem(file, _line(clusters[name][1], "circuit_breakers")
                    or _line(clusters[name][1]),
                    f"static_resources.clusters[{clusters[name][0]}].circuit_breakers",
                    reason, "warning") for name, reason in found]


def _stream_limits(doc: Any, clusters: dict[str, tuple[int, dict]]
                   ) -> Iterator[tuple[str, str]]:
    """(cluster, reason) for each ext_proc cluster whose limits on concurrent requests
    are Envoy's defaults or below: each exchange holds one ext_proc stream for its whole
    answer, minutes for a streamed one."""
    for name in sorted(clusters.keys() & {_grpc_cluster(f) for f in _walk(doc)
                                          if _is_ext_proc(f)}):
        low = []
        for key in ("max_requests", "max_pending_requests"):
            limit, said = _limit(clusters[name][1], key)
            if limit is not None and limit <= ENVOY_DEFAULT_LIMITS[key]:
                low.append(said)
        if low:
            yield name, (f"ATP's ext_proc cluster {name!r} has {' and '.join(low)}: each "
                         "exchange holds one ext_proc stream for its whole answer (minutes "
                         "for a streamed one), so past that many at once Envoy fails "
                         "requests with a 500 while ATP idles; raise circuit_breakers."
                         "thresholds[].max_requests and max_pending_requests (the shipped "
                         "configs: 65536)")


def _retry_limits(static: Any, clusters: dict[str, tuple[int, dict]],
                  model_clusters: Collection[str] | None) -> Iterator[tuple[str, str]]:
    """(cluster, reason) for each cluster a route of a listener ATP checks retries onto
    (one of `model_clusters`, None: any a route names) whose max_retries for the route's
    priority is Envoy's default or below: past it in flight, retries are not made."""
    retried: dict[tuple[str, str], str] = {}  # (cluster, priority) → the first route
    for listener in _checked_listeners(static):
        for host in _walk(listener):
            for index, route in enumerate(host.get("routes") or () if "domains" in host
                                          else ()):
                action = route.get("route") if isinstance(route, dict) else None
                if not isinstance(action, dict) or not _retries(
                        action["retry_policy"] if "retry_policy" in action
                        else host.get("retry_policy")):
                    continue
                # A route by header may send to (and retry onto) any model's cluster.
                by_header = "cluster_header" in action or any(
                    "cluster_header" in c for c in _weighted(action))
                named = {*_named_clusters(action), *(model_clusters or () if by_header
                                                     else ())}
                priority = _enum(action.get("priority"), PRIORITIES) or "DEFAULT"
                for name in named & clusters.keys():
                    if model_clusters is None or name in model_clusters:
                        retried.setdefault((name, priority), _route_name(host, index, route))
    for (name, priority), where in retried.items():
        limit, said = _limit(clusters[name][1], "max_retries", priority)
        if limit is not None and limit <= ENVOY_DEFAULT_LIMITS["max_retries"]:
            yield name, (f"cluster {name!r} has {said}"
                         f"{' for HIGH priority' if priority == 'HIGH' else ''}, yet {where} "
                         f"retries onto it: once more than {limit} of its requests fail at "
                         "once, the rest are not retried and get the primary's error, not "
                         "the fallback's answer; raise circuit_breakers.thresholds[]."
                         "max_retries to as many requests as may fail over at once "
                         "(envoy/front-proxy.yaml: 4096, its max_requests)")


def check_file(path: str | Path, why: list[str],
               jwt: tuple[str, str] | None = None,
               model_clusters: Collection[str] | None = None,
               max_body_bytes: int | None = None,
               mirrored: Collection[str] = ()) -> list[Problem]:
    """Fail-open problems, answers that go astray and circuit breakers too small
    (`model_clusters`: atp.yaml's, None: unknown), with `jwt` (auth.jwt's metadata
    namespace and payload key) where a token's claims would not reach ATP, with
    `max_body_bytes` (atp.yaml's) a buffer too small for it, and with `mirrored`
    (atp.yaml's routes that mirror to a challenger) no route that mirrors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(str(path), 0, "", f"cannot read: {exc}")]
    doc, _ = load_yaml(text, str(path), envoy=True)
    if isinstance(doc, dict) and "apiVersion" in doc and isinstance(doc.get("kind"), str):
        # Checked as a bootstrap, it said "no ext_proc filter" of a file that holds one.
        where = {"ConfigMap": "check the one in its data (data.\"envoy.yaml\" written "
                              "to a file)",
                 "EnvoyFilter": "--envoy takes an Envoy bootstrap (an EnvoyFilter patches "
                                "the mesh's own config, which is not in this file)"}.get(
            doc["kind"], "--envoy takes an Envoy bootstrap")
        return [Problem(str(path), _line(doc, "kind") or 1, "kind",
                        f"a Kubernetes {doc['kind']}, no Envoy config: {where}")]
    problems = fail_open_problems(str(path), text, why, model_clusters)
    problems += answer_problems(str(path), text, model_clusters)
    problems += capacity_problems(str(path), text, model_clusters)
    if model_clusters is not None:
        problems += missing_cluster_problems(str(path), text, model_clusters)
    if jwt is not None:
        problems += jwt_problems(str(path), text, *jwt)
    if max_body_bytes is not None:
        problems += buffer_problems(str(path), text, max_body_bytes)
    if mirrored:
        problems += mirror_problems(str(path), text, mirrored)
    return problems


def mirror_problems(file: str, text: str, mirrored: Collection[str]) -> list[Problem]:
    """A config in which no route of a listener ATP checks mirrors requests, where
    atp.yaml's `mirrored` routes mirror to a challenger: their records name it, no copy
    is ever sent, and the challenger never learns."""
    doc, _ = load_yaml(text, file, envoy=True)
    static = doc.get("static_resources") if isinstance(doc, dict) else None
    checked = _checked_listeners(static)
    if not checked or any("rds" in node or node.get("request_mirror_policies")
                          for listener in checked for node in _walk(listener)):
        return []  # (routes from a control plane cannot be read here)
    return [Problem(file, _line(static, "listeners"), "static_resources.listeners",
                    f"no route of a listener ATP checks mirrors requests "
                    f"(request_mirror_policies), but atp.yaml's route(s) "
                    f"{', '.join(sorted(mirrored))} mirror to a challenger: their records "
                    "would name it, no copy would be sent, and it would never learn")]
