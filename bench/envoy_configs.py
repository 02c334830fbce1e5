"""Edits of the shipped front-proxy config, one per benchmarked variant.

Every variant starts from envoy/front-proxy.yaml as rendered by atp_extproc.stack, so
listener, access log, local replies and clusters stay those users run; each edit changes
only what the variant is about.
"""

from __future__ import annotations

import copy
from typing import Any

EXT_PROC = "envoy.filters.http.ext_proc"
HEADER_MUTATION = "envoy.filters.http.header_mutation"

Doc = dict[str, Any]


def _hcm(doc: Doc) -> Doc:
    """The front listener's http_connection_manager config."""
    listener = doc["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]
    assert manager["name"] == "envoy.filters.network.http_connection_manager"
    return manager["typed_config"]


def _filter(hcm: Doc, name: str) -> Doc:
    matches = [f for f in hcm["http_filters"] if f["name"] == name]
    if len(matches) != 1:
        raise ValueError(f"expected one {name} filter, found {len(matches)}")
    return matches[0]


def envoy_alone(doc: Doc) -> None:
    """(a) No ext_proc, no header_mutation, one route straight to demo_a.

    The atp cluster goes too: nothing uses it, and its health checks would otherwise
    fail against a closed port in the background of the measurement.
    """
    hcm = _hcm(doc)
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if f["name"] not in (EXT_PROC, HEADER_MUTATION)]
    host = hcm["route_config"]["virtual_hosts"][0]
    host["routes"] = [
        {"match": {"prefix": "/"}, "route": {"cluster": "demo_a", "timeout": "600s"}},
    ]
    del host["typed_per_filter_config"]  # ext_proc's, which is gone
    clusters = doc["static_resources"]["clusters"]
    doc["static_resources"]["clusters"] = [c for c in clusters if c["name"] != "atp"]


def response_phases_off(doc: Doc) -> None:
    """(c2) The main filter never sees the response: the floor for observation."""
    hcm = _hcm(doc)
    # The virtual host's override sets the modes of routed requests. (A copy: the
    # shipped file shares one mode between its listeners.)
    overrides = hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"][
        EXT_PROC]["overrides"]
    overrides["processing_mode"] = {**overrides["processing_mode"],
                                    "response_header_mode": "SKIP",
                                    "response_body_mode": "NONE"}


def _add_observer(doc: Doc) -> Doc:
    """Response phases off in the main filter, plus a second ext_proc filter right after
    it in observability mode: Envoy sends it response headers and the streamed body
    without waiting for answers (ATP never answers observability messages)."""
    response_phases_off(doc)
    hcm = _hcm(doc)
    main = _filter(hcm, EXT_PROC)
    observer = copy.deepcopy(main)
    # A name of its own: the virtual host's per-route modes are the main filter's, and
    # Envoy finds them by name.
    observer["name"] = "atp.observer"
    config = observer["typed_config"]
    config["observability_mode"] = True
    # Its own stats (http.front.ext_proc.observe.*), to show that it really observed.
    config["stat_prefix"] = "observe"
    # Nothing to override: Envoy ignores answers in observability mode.
    config["allow_mode_override"] = False
    config["processing_mode"] = {
        "request_header_mode": "SKIP",
        "request_body_mode": "NONE",
        "response_header_mode": "SEND",
        "response_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    filters = hcm["http_filters"]
    filters.insert(filters.index(main) + 1, observer)
    return config


def observability_filter(doc: Doc) -> None:
    """(c3) The observer as specified.

    In observability mode Envoy keeps each side stream open after the request ends
    (deferred_close_timeout, 5 s by default) unless the server closes it, and ATP keeps
    reading until Envoy does. At a few hundred req/s that is thousands of open streams,
    past Envoy's default circuit breaker (1024 requests) but within the one the shipped
    atp cluster sets.
    """
    _add_observer(doc)


# Long enough for ATP to read the observed response under load (at 200 ms no observation
# was lost in trials; at 50 ms almost half were), short enough to keep few streams open.
PROMPT_CLOSE = "0.2s"


def observability_filter_prompt_close(doc: Doc) -> None:
    """(c3s) The observer with its side stream closed 200 ms after the response: what c3
    costs once ATP ends observation streams itself at end_of_stream."""
    _add_observer(doc)["deferred_close_timeout"] = PROMPT_CLOSE
