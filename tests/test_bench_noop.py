"""The bench's no-op ext_proc: its rewrite mode answers as a gateway must."""

from __future__ import annotations

import json

from bench.noop_extproc import rewrite_answer


def test_the_rewrite_answer_carries_the_new_body_its_length_and_the_route() -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi"}]}).encode()
    common = rewrite_answer(body, "demo_a").request_body.response
    new_body = common.body_mutation.body
    assert json.loads(new_body)["model"] != "gpt-4o-mini"
    assert json.loads(new_body)["messages"] == [{"role": "user", "content": "hi"}]
    headers = {o.header.key: o.header.raw_value for o in common.header_mutation.set_headers}
    assert headers == {"x-atp-cluster": b"demo_a", "content-length": b"%d" % len(new_body)}
    assert len(new_body) != len(body) and common.clear_route_cache
