"""cel-expr-python (the engine) and cel-python (the oracle) agree on every example policy.

Attribute documents are generated from a fixed seed around the values the example
policies test (tenants, aliases, data classes, limits, tools, claims, hours ...), plus
edge values (empty, zero, absent claims). Each policy is evaluated by both engines for
each target it has (the request, each candidate, each tool): true, false or error must be
the same. The engine's one-program batch path must give the same answer as evaluating
each policy on its own.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from atp_extproc.policy import CandidateInfo, PolicySet, build_attributes, load_file
from atp_extproc.policy.engine import CANDIDATE, REQUEST, TOOL
from atp_extproc.policy.oracle import ERROR, Oracle

ROOT = Path(__file__).resolve().parent.parent
DOCS = 250
SEED = 20260101

TENANTS = ["alice", "bob", "carol", ""]
METHODS = ["api_key", "jwt", "trusted_header", "anonymous"]
ALIASES = ["gpt-4o", "gpt-4o-mini", "fast", "text-embedding-3-small", "other"]
OPERATIONS = ["chat", "completions", "embeddings", "responses"]
CLASSES = ["email", "phone", "card", "iban", "api_key", "github_token", "ssn"]
TOOLS = ["get_weather", "search_docs", "shell", "calendar", "exec", "run_code"]
MODELS = [
    CandidateInfo("small", "demo_a", "local", "internal", 0.00015, 0.0006, "demo_a"),
    CandidateInfo("large", "demo_b", "local", "external", 0.0025, 0.01, "demo_b"),
    CandidateInfo("embed", "demo_a", "local", "internal", 0.00002, 0.0, "demo_a"),
    CandidateInfo("eu-large", "prov", "eu", "external", 0.004, 0.02, "prov"),
]


def example_policies() -> list:
    # atp.yaml's own policies and the files it includes (examples/policies/*.yaml).
    return list(load_file(ROOT / "examples" / "atp.yaml").policies)


def random_doc(rng: random.Random, i: int):
    subject = {"tenant": rng.choice(TENANTS), "auth_method": rng.choice(METHODS)}
    if rng.random() < 0.5:
        subject["user"] = rng.choice(["", "a@example.com"])
    if rng.random() < 0.4:
        subject["groups"] = rng.sample(["llm-users", "eng", "ops"], rng.randint(0, 2))
    if rng.random() < 0.5:
        claims = {}
        if rng.random() < 0.5:
            claims["suspended"] = rng.choice([True, False, "yes"])
        if rng.random() < 0.6:
            claims["residency"] = rng.choice(["local", "eu", "us", 1])
        subject["claims"] = claims
    request = {
        "operation": rng.choice(OPERATIONS), "alias": rng.choice(ALIASES),
        "stream": rng.random() < 0.3,
        "token_estimate": rng.choice([0, 50, 99_999, 100_000, 100_001, 250_000]),
        "message_count": rng.choice([0, 1, 200, 201]),
        "max_tokens": rng.choice([0, 100, 1024, 1025, 4096, 4097, 9000]),
    }
    if rng.random() < 0.6:
        request["data_classes"] = {c: rng.choice([0, 1, 20, 21, 50])
                                   for c in rng.sample(CLASSES, rng.randint(0, 3))}
    if rng.random() < 0.6:
        tools = []
        for name in rng.sample(TOOLS, rng.randint(0, 3)):
            tool = {"name": name, "declared": rng.random() < 0.8,
                    "called": rng.random() < 0.5}
            if name == "search_docs" and rng.random() < 0.8:
                # Texts CEL's int() refuses though Python's int() takes them.
                tool["arguments"] = {"max_results": rng.choice(
                    ["10", "50", "51", "abc", " 51", "+51", "5_1", "\u0665\u0661", "0x40"])}
            tools.append(tool)
        request["tool_details"] = tools
        if rng.random() < 0.2:
            request["tool_count"] = rng.choice([32, 33, 100])
    context = {"environment": rng.choice(["prod", "dev", ""]),
               "time": f"2026-03-01T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z"}
    if rng.random() < 0.15:
        context["truncated"] = ["request.tools"]
    candidates = rng.sample(MODELS, rng.randint(0, 3))
    return build_attributes(subject, request, context), candidates


@pytest.fixture(scope="module")
def policy_set() -> PolicySet:
    return PolicySet.compile(example_policies())


def normalise(value):
    return value if isinstance(value, bool) else ERROR


def test_engine_and_oracle_agree_on_every_example_policy(policy_set, capsys):
    oracle = Oracle()
    rng = random.Random(SEED)
    agreed = 0
    disagreements = []
    per_policy = {p.id: 0 for p in policy_set.policies}
    outcomes_seen = {p.id: set() for p in policy_set.policies}
    for i in range(DOCS):
        attrs, candidates = random_doc(rng, i)
        resources = [c.resource(attrs.request) for c in candidates]
        batch = policy_set.raw_results(attrs, candidates)
        single = policy_set.raw_results(attrs, candidates, batch=False)
        if isinstance(batch, list):
            assert batch == single, f"doc {i}: batch and single evaluation differ"
        req, cand, tool = single
        for p in policy_set.policies:
            if p.level == REQUEST:
                group = policy_set._request
                targets = [(req[group.index(p)], attrs.to_proto(), None, None)]
            elif p.level == CANDIDATE:
                group = policy_set._candidate
                targets = [(row[group.index(p)], attrs.to_proto(), res, None)
                           for row, res in zip(cand, resources, strict=True)]
            else:
                assert p.level == TOOL
                group = policy_set._tool
                targets = [(row[group.index(p)], attrs.to_proto(), None, t)
                           for row, t in zip(tool, attrs.request.tool_details, strict=True)]
            for engine_value, doc, res, t in targets:
                expected = oracle.evaluate(p.expression, doc, resource=res, tool=t)
                got = normalise(engine_value)
                outcomes_seen[p.id].add(got)
                if got == expected:
                    agreed += 1
                    per_policy[p.id] += 1
                else:
                    disagreements.append((i, p.id, got, expected))
    with capsys.disabled():
        print(f"\noracle agreement: {agreed} evaluations agree across {len(per_policy)} "
              f"example policies and {DOCS} documents; {len(disagreements)} disagree")
    assert disagreements == []
    assert all(n > 0 for n in per_policy.values()), per_policy
    # The generated documents exercise both outcomes of every policy.
    assert [pid for pid, seen in outcomes_seen.items() if not {True, False} <= seen] == []
    assert agreed >= 5000


def test_oracle_follows_proto3_presence_for_has():
    oracle = Oracle()
    doc = build_attributes(subject={"claims": {"a": 1}}, request={"max_tokens": 5}).to_proto()
    assert oracle.evaluate("has(request.max_tokens)", doc) is True
    assert oracle.evaluate("has(request.alias)", doc) is False
    assert oracle.evaluate("has(subject.claims.a)", doc) is True
    assert oracle.evaluate("has(subject.claims.b)", doc) is False
    ps = PolicySet.compile([
        {"id": "h.a", "effect": "deny", "expression": "has(request.max_tokens)"},
        {"id": "h.b", "effect": "deny", "expression": "has(request.alias)"}])
    out = ps.evaluate(build_attributes(request={"max_tokens": 5}), [])
    assert [r.decision for r in out.records] == ["deny", "allow"]


def engine_and_oracle(expression: str, attrs) -> tuple:
    ps = PolicySet.compile([{"id": "o.p", "effect": "deny", "expression": expression}])
    return (normalise(ps.raw_results(attrs, batch=False)[0][0]),
            Oracle().evaluate(expression, attrs.to_proto()))


@pytest.mark.parametrize(("expression", "claims", "expected"), [
    # A string built by an operator is the same CEL type as one read from a field.
    ("subject.tenant + '-' + context.environment == 'alice-prod'", None, True),
    ("subject.tenant + '-' + context.environment != 'alice-prod'", None, False),
    ("subject.groups.map(g, g + '-x').exists(x, x == 'eng-x')", None, True),
    ("[subject.tenant + 'x'] == ['alicex']", None, True),
    ("type(subject.tenant + 'x') == string", None, True),
    # int() of a string is checked as the runtime parses it; `int` the type is unchanged.
    ("type(request.max_tokens) == int && type(int('7')) == int", None, True),
    # has() tests its last key only: reading the ones before it can fail.
    ("has(subject.claims.org.suspended)", None, ERROR),
    ("has(subject.claims.org.suspended)", {"org": {}}, False),
    ("has(subject.claims.org.suspended)", {"org": {"suspended": True}}, True),
    ("has(subject.claims['org'].suspended)", {"org": "acme"}, ERROR),
    ("has(subject.claims.org)", {"org": None}, True),
])
def test_oracle_agrees_on_strings_built_types_and_nested_has(expression, claims, expected):
    subject = {"tenant": "alice", "auth_method": "jwt", "groups": ["eng"]}
    if claims is not None:
        subject["claims"] = claims
    attrs = build_attributes(subject, {"operation": "chat"}, {"environment": "prod"})
    assert engine_and_oracle(expression, attrs) == (expected, expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("51", True), (" 51\t", True), ("+51", True), ("051", True), ("-0", False),
    ("5_1", ERROR), ("\u0665\u0661", ERROR), ("\uff15\uff11", ERROR), ("0x40", ERROR),
    ("\u00a051", ERROR), ("1e2", ERROR), ("+-5", ERROR), ("9223372036854775808", ERROR),
])
def test_oracle_reads_int_of_a_string_as_the_runtime_does(text, expected):
    # tools.search_max_results: int() of a string takes ASCII whitespace around, one
    # sign and ASCII digits, where Python's int() also takes "5_1", other scripts' digits
    # and (cel-python) hex.
    (policy,) = [p for p in example_policies() if p.spec.id == "tools.search_max_results"]
    ps = PolicySet.compile([policy])
    attrs = build_attributes({"tenant": "bob", "auth_method": "api_key"}, {
        "operation": "chat", "tool_details": [
            {"name": "search_docs", "called": True, "arguments": {"max_results": text}}]})
    engine = normalise(ps.raw_results(attrs, batch=False)[2][0][0])
    oracle = Oracle().evaluate(policy.spec.expression, attrs.to_proto(),
                               tool=attrs.doc.request.tool_details[0])
    assert (engine, oracle) == (expected, expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("51", True), ("+51", True), (" 51 ", True), ("-51", ERROR), ("-0", ERROR),
    ("5_1", ERROR), ("0x40", ERROR), ("18446744073709551615", False),
    ("18446744073709551616", ERROR),
])
def test_oracle_reads_uint_of_a_string_as_the_runtime_does(text, expected):
    attrs = build_attributes({"tenant": "a", "auth_method": "api_key"},
                             {"operation": "chat", "metadata": {"n": text}})
    assert engine_and_oracle("uint(request.metadata.n) > 50u && "
                             "uint(request.metadata.n) < 52u", attrs) == (expected, expected)
