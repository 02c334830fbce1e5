"""Refuse Envoy configs that fail open where ATP's policies must hold.

Fail-open (`failure_mode_allow: true`) forwards the original, unredacted body when ATP is
down or slow, so a deny, restrict, tools or redact policy (or redaction itself) silently
stops applying. For every ext_proc filter of every HTTP connection manager this checks the
filter's own `failure_mode_allow` and `disabled`, and each route's (virtual host's, route
config's) ExtProcPerRoute override (`overrides.failure_mode_allow`, `disabled`), bare or
inside an envoy.config.route.v3.FilterConfig (whose own `disabled` also turns it off).
Routes that answer directly (`direct_response`, `redirect`) send nothing upstream and
are skipped.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from atp_extproc.policy.settings import Problem, load_yaml

EXT_PROC_TYPE = "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
PER_ROUTE_TYPE = "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
# The generic per-route wrapper: its `disabled` turns any filter off on a route, and any
# entry that is not disabled turns on a filter that is `disabled: true` by default.
FILTER_CONFIG_TYPE = "envoy.config.route.v3.FilterConfig"


def _line(node: Any, key: Any = None) -> int:
    if key is not None and hasattr(node, "key_lines") and key in node.key_lines:
        return node.key_lines[key]
    return getattr(node, "line", 0)


def _bool(value: Any) -> bool | None:
    """A bool or a google.protobuf.BoolValue written as {value: bool}."""
    if isinstance(value, bool):
        return value
    if isinstance(value, dict) and isinstance(value.get("value"), bool):
        return value["value"]
    return None


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


def _per_route(holder: Any, names: set[str]) -> tuple[dict | None, int]:
    """The ext_proc entry of a route's (virtual host's, route config's)
    typed_per_filter_config and its line: under the filter's name, or an ExtProcPerRoute
    (bare or in a FilterConfig) under any name."""
    cfg = holder.get("typed_per_filter_config") if isinstance(holder, dict) else None
    if not isinstance(cfg, dict):
        return None, 0
    for name, value in cfg.items():
        if not isinstance(value, dict):
            continue
        if name in names or _is_type(value, PER_ROUTE_TYPE) or (
                _is_type(value, FILTER_CONFIG_TYPE)
                and _is_type(value.get("config"), PER_ROUTE_TYPE)):
            return value, _line(cfg, name)
    return None, 0


def _override(per_route: dict | None) -> tuple[bool | None, bool, dict | None]:
    """(failure_mode_allow override or None, disabled, processing_mode override or None)
    of a per-route entry, looking inside a FilterConfig wrapper."""
    if per_route is None:
        return None, False, None
    if _is_type(per_route, FILTER_CONFIG_TYPE):
        if per_route.get("disabled") is True:
            return None, True, None  # the filter is off; its `config` is ignored
        inner = per_route.get("config")
        per_route = inner if isinstance(inner, dict) else {}
    disabled = per_route.get("disabled") is True
    overrides = per_route.get("overrides")
    if not isinstance(overrides, dict):
        return None, disabled, None
    mode = overrides.get("processing_mode")
    return (_bool(overrides.get("failure_mode_allow")), disabled,
            mode if isinstance(mode, dict) else None)


def _withheld(mode: dict) -> str | None:
    """What of the request a processing mode keeps from ATP, which needs both the
    headers (who asks, where) and the whole body (what): None if nothing."""
    if mode.get("request_header_mode") == "SKIP":
        return "request_header_mode: SKIP"
    if mode.get("request_body_mode", "NONE") == "NONE":
        return "request_body_mode: NONE"
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


def fail_open_problems(file: str, text: str, why: list[str],
                       model_clusters: Collection[str] | None = None) -> list[Problem]:
    """Problems for ext_proc that fails open, or is missing where requests may reach a
    model's cluster (`model_clusters`, from atp.yaml; None: any cluster); errors when
    `why` (reasons ATP's decisions must hold) is not empty, warnings otherwise."""
    doc, problems = load_yaml(text, file)
    if doc is None:
        return problems
    severity = "error" if why else "warning"
    because = f" while {'; '.join(why)}" if why else ""
    asked = False
    for hcm in _walk(doc):
        filters = hcm.get("http_filters")
        if not isinstance(filters, list):
            continue
        ext = [f for f in filters if isinstance(f, dict) and _is_ext_proc(f)]
        if not ext:
            if _is_connection_manager(hcm) and _may_reach(hcm, model_clusters):
                # Another listener's ext_proc does not cover this one.
                asked = True
                problems.append(Problem(
                    file, _line(hcm, "http_filters"), "http_filters",
                    f"no ext_proc filter: requests to this connection manager "
                    f"({hcm.get('stat_prefix', '?')}) may reach a model's cluster unchecked "
                    f"by ATP{because}", severity))  # type: ignore[arg-type]
            continue
        asked = True
        names = {str(f.get("name")) for f in ext}
        filter_open = False
        filter_line = 0
        for f in ext:
            typed = f.get("typed_config") if isinstance(f.get("typed_config"), dict) else {}
            if typed.get("failure_mode_allow") is True:
                filter_open = True
                filter_line = _line(typed, "failure_mode_allow")
        for f in ext:
            typed = f.get("typed_config") if isinstance(f.get("typed_config"), dict) else {}
            mode = typed.get("processing_mode")
            withheld = _withheld(mode if isinstance(mode, dict) else {})
            if withheld is not None:
                problems.append(Problem(
                    file, _line(typed, "processing_mode") or _line(f), "ext_proc",
                    f"processing_mode {withheld} (the default where unset): requests go "
                    f"upstream without ATP reading them{because}",
                    severity))  # type: ignore[arg-type]
        # `disabled: true` on the HttpFilter: off on every route that does not turn it on.
        filter_off = all(f.get("disabled") is True for f in ext)
        off_line = _line(ext[0], "disabled")
        off_reason = f"ext_proc is disabled on this route: requests skip ATP{because}"
        route_config = hcm.get("route_config")
        vhosts = route_config.get("virtual_hosts") if isinstance(route_config, dict) else None
        if not isinstance(vhosts, list):
            # Routes come from elsewhere (RDS): only the filter itself can be judged.
            if filter_off:
                problems.append(Problem(
                    file, off_line, "ext_proc",
                    f"disabled: true turns ext_proc off unless a route turns it on{because}",
                    severity))  # type: ignore[arg-type]
            if filter_open:
                problems.append(Problem(file, filter_line, "ext_proc",
                                        f"failure_mode_allow: true fails open{because}",
                                        severity))  # type: ignore[arg-type]
            continue
        rc_cfg, rc_line = _per_route(route_config, names)
        for vhost in vhosts:
            if not isinstance(vhost, dict):
                continue
            vh_cfg, vh_line = _per_route(vhost, names)
            for index, route in enumerate(vhost.get("routes") or ()):
                if not isinstance(route, dict) or not _route_may_reach(route,
                                                                       model_clusters):
                    continue
                r_cfg, r_line = _per_route(route, names)
                where = _route_name(vhost, index, route)
                # Most specific first, as Envoy looks them up.
                levels = [(line, *_override(cfg)) for cfg, line in
                          ((r_cfg, r_line), (vh_cfg, vh_line), (rc_cfg, rc_line))
                          if cfg is not None]
                if levels:
                    line, _, disabled, _ = levels[0]
                else:
                    line, disabled = off_line, filter_off
                if disabled:
                    problems.append(Problem(file, line or _line(route), where, off_reason,
                                            severity))  # type: ignore[arg-type]
                    continue
                mode_line, mode = next(((line, mode) for line, _, _, mode in levels
                                        if mode is not None), (0, None))
                # Envoy takes a route's processing_mode whole: what it leaves unset is the
                # default (request_body_mode NONE), not the filter's setting.
                withheld = _withheld(mode) if mode is not None else None
                if withheld is not None:
                    problems.append(Problem(
                        file, mode_line, where,
                        f"a processing_mode override ({withheld}) sends the request "
                        f"upstream without ATP reading it{because}",
                        severity))  # type: ignore[arg-type]
                # ext_proc merges its per-route overrides: the most specific one set wins.
                fma, line = next(((fma, line) for line, fma, _, _ in levels
                                  if fma is not None), (filter_open, filter_line))
                if fma:
                    problems.append(Problem(
                        file, line, where,
                        f"ext_proc fails open (failure_mode_allow: true): when ATP is down "
                        f"the original, unredacted request goes upstream{because}",
                        severity))  # type: ignore[arg-type]
    for proxy in _walk(doc):
        if _is_type(proxy, TCP_PROXY_TYPE) and _tcp_reaches(proxy, model_clusters):
            asked = True  # said here, more precisely than "no ext_proc filter"
            problems.append(Problem(
                file, _line(proxy), "tcp_proxy",
                f"a tcp_proxy to a model's cluster ({proxy.get('stat_prefix', '?')}) "
                f"passes requests on unread by ATP{because}",
                severity))  # type: ignore[arg-type]
    if not asked:
        # A config that never asks ATP sends every request on unchecked (an egress proxy
        # placed after ATP has none, but it is not the config ATP is checked against).
        problems.append(Problem(file, 1, "http_filters",
                                f"no ext_proc filter: no request is ever checked by ATP"
                                f"{because}", severity))  # type: ignore[arg-type]
    return problems


TCP_PROXY_TYPE = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def _tcp_reaches(proxy: dict, clusters: Collection[str] | None) -> bool:
    return clusters is None or any(name in clusters for name in _named_clusters(proxy))


def _named_clusters(action: dict) -> list[Any]:
    """The clusters a route action or a tcp_proxy names: `cluster`, `weighted_clusters`."""
    weighted = action.get("weighted_clusters")
    return [action.get("cluster")] + [
        c.get("name") for c in (weighted.get("clusters") or ()
                                 if isinstance(weighted, dict) else ()) if isinstance(c, dict)]


def _is_connection_manager(node: dict) -> bool:
    # A cluster's upstream filters (HttpProtocolOptions) are http_filters too.
    return any(key in node for key in ("route_config", "rds", "scoped_routes"))


def _may_reach(hcm: dict, clusters: Collection[str] | None) -> bool:
    """Whether a connection manager may send requests to one of `clusters` (None: to
    any): routes it gets from elsewhere (RDS), or one that may (_route_may_reach)."""
    route_config = hcm.get("route_config")
    if not isinstance(route_config, dict):
        return True
    return any(isinstance(route, dict) and _route_may_reach(route, clusters)
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
    return any(name in clusters for name in _named_clusters(action))


JWT_AUTHN_TYPE = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"


def jwt_problems(file: str, text: str, namespace: str, payload_key: str) -> list[Problem]:
    """Where a jwt_authn filter's claims would never reach ATP (auth.jwt): a provider
    that writes them under another key than `payload_key` (or not at all), a jwt_authn
    filter after ext_proc, or an ext_proc filter that does not forward `namespace`.
    Every token would then be ignored: its caller refused, or served as anonymous."""
    doc, problems = load_yaml(text, file)
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


def check_file(path: str | Path, why: list[str],
               jwt: tuple[str, str] | None = None,
               model_clusters: Collection[str] | None = None) -> list[Problem]:
    """Fail-open problems (`model_clusters`: atp.yaml's, None: unknown), and with `jwt`
    (auth.jwt's metadata namespace and payload key) where a token's claims would not
    reach ATP."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(str(path), 0, "", f"cannot read: {exc}")]
    problems = fail_open_problems(str(path), text, why, model_clusters)
    if jwt is not None:
        problems += jwt_problems(str(path), text, *jwt)
    return problems
