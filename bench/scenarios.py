"""The benchmarked variants: which ext_proc server runs and how the Envoy config is edited."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bench import envoy_configs

ExtProc = Literal["none", "noop", "atp"]


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    ext_proc: ExtProc
    edit: Callable[[dict], None] | None = None
    # Command-line options of the no-op server.
    noop_options: tuple[str, ...] = ()


ENVOY_ALONE = Scenario("a", "Envoy alone", "none", envoy_configs.envoy_alone)
NOOP = Scenario("b", "Envoy + no-op ext_proc", "noop")
# (b) taking ATP's four messages: what an ext_proc reaches that adds ATP's protocol and
# nothing else, the ceiling of (c)/(b) for any work ATP does.
NOOP_FOUR_MESSAGES = Scenario("b4", "no-op, ATP's four messages", "noop",
                              noop_options=("--read-response-body",))
# (b4) that also does the one job no gateway can skip: parse the body, rewrite its model,
# send the new body back, read the answer's usage. What any gateway on this stack reaches.
NOOP_REWRITE = Scenario("r", "minimal gateway: (b4) + model rewrite + usage read", "noop",
                        noop_options=("--rewrite",))
ATP = Scenario("c", "Envoy + ATP (shipped config)", "atp")
# Response observation variants; c1 is ATP above (same processes, same config).
ATP_NO_RESPONSE = Scenario("c2", "ATP, response phases off", "atp",
                           envoy_configs.response_phases_off)
ATP_OBSERVER = Scenario("c3", "ATP, response phases off + observability filter", "atp",
                        envoy_configs.observability_filter)
ATP_OBSERVER_PROMPT = Scenario("c3s", "as c3, observer streams closed 200 ms after the reply",
                               "atp", envoy_configs.observability_filter_prompt_close)
