"""Refuse Envoy configs that fail open where ATP's policies must hold.

Fail-open (`failure_mode_allow: true`) forwards the original, unredacted body when ATP is
down or slow, so a deny, restrict, tools or redact policy (or redaction itself) silently
stops applying. For every ext_proc filter of every HTTP connection manager this checks the
filter's own `failure_mode_allow` and each route's (and virtual host's) ExtProcPerRoute
override (`overrides.failure_mode_allow`, `disabled`). Routes that answer directly
(`direct_response`, `redirect`) send nothing upstream and are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atp_extproc.policy.settings import Problem, load_yaml

EXT_PROC_TYPE = "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
PER_ROUTE_TYPE = "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"


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


def _is_ext_proc(http_filter: dict) -> bool:
    typed = http_filter.get("typed_config")
    kind = typed.get("@type", "") if isinstance(typed, dict) else ""
    return kind.endswith(EXT_PROC_TYPE) or http_filter.get("name") == \
        "envoy.filters.http.ext_proc"


def _per_route(holder: dict, names: set[str]) -> tuple[dict | None, int]:
    cfg = holder.get("typed_per_filter_config")
    if not isinstance(cfg, dict):
        return None, 0
    for name, value in cfg.items():
        if name in names and isinstance(value, dict):
            return value, _line(cfg, name)
        if isinstance(value, dict) and str(value.get("@type", "")).endswith(PER_ROUTE_TYPE):
            return value, _line(cfg, name)
    return None, 0


def _override(per_route: dict | None) -> tuple[bool | None, bool]:
    """(failure_mode_allow override or None, disabled)."""
    if per_route is None:
        return None, False
    disabled = per_route.get("disabled") is True
    overrides = per_route.get("overrides")
    fma = _bool(overrides.get("failure_mode_allow")) if isinstance(overrides, dict) else None
    return fma, disabled


def _route_name(vhost: dict, route: dict) -> str:
    match = route.get("match") if isinstance(route.get("match"), dict) else {}
    keys = ("prefix", "path", "safe_regex", "path_separated_prefix")
    what = next((f"{k}={match[k]}" for k in keys
                 if k in match), "match")
    name = route.get("name")
    return f"virtual host {vhost.get('name', '?')} route {name or what}"


def fail_open_problems(file: str, text: str, why: list[str]) -> list[Problem]:
    """Problems for ext_proc that fails open; errors when `why` (reasons ATP's decisions
    must hold) is not empty, warnings otherwise."""
    doc, problems = load_yaml(text, file)
    if doc is None:
        return problems
    severity = "error" if why else "warning"
    because = f" while {'; '.join(why)}" if why else ""
    for hcm in _walk(doc):
        filters = hcm.get("http_filters")
        if not isinstance(filters, list):
            continue
        ext = [f for f in filters if isinstance(f, dict) and _is_ext_proc(f)]
        if not ext:
            continue
        names = {str(f.get("name")) for f in ext}
        filter_open = False
        filter_line = 0
        for f in ext:
            typed = f.get("typed_config") if isinstance(f.get("typed_config"), dict) else {}
            if typed.get("failure_mode_allow") is True:
                filter_open = True
                filter_line = _line(typed, "failure_mode_allow")
        route_config = hcm.get("route_config")
        vhosts = route_config.get("virtual_hosts") if isinstance(route_config, dict) else None
        if not isinstance(vhosts, list):
            if filter_open:
                problems.append(Problem(file, filter_line, "ext_proc",
                                        f"failure_mode_allow: true fails open{because}",
                                        severity))  # type: ignore[arg-type]
            continue
        for vhost in vhosts:
            if not isinstance(vhost, dict):
                continue
            vh_cfg, vh_line = _per_route(vhost, names)
            vh_fma, vh_disabled = _override(vh_cfg)
            for route in vhost.get("routes") or ():
                if not isinstance(route, dict) or "direct_response" in route or \
                        "redirect" in route:
                    continue
                r_cfg, r_line = _per_route(route, names)
                r_fma, r_disabled = _override(r_cfg)
                where = _route_name(vhost, route)
                if r_disabled or (vh_disabled and r_cfg is None):
                    problems.append(Problem(
                        file, r_line or vh_line or _line(route), where,
                        f"ext_proc is disabled on this route: requests skip ATP{because}",
                        severity))  # type: ignore[arg-type]
                    continue
                fma = r_fma if r_fma is not None else vh_fma if vh_fma is not None \
                    else filter_open
                if fma:
                    line = r_line if r_fma is not None else vh_line if vh_fma is not None \
                        else filter_line
                    problems.append(Problem(
                        file, line, where,
                        f"ext_proc fails open (failure_mode_allow: true): when ATP is down "
                        f"the original, unredacted request goes upstream{because}",
                        severity))  # type: ignore[arg-type]
    return problems


def check_file(path: str | Path, why: list[str]) -> list[Problem]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(str(path), 0, "", f"cannot read: {exc}")]
    return fail_open_problems(str(path), text, why)
