"""The policy engine: combining rules, modes, errors, records, stats and reload."""

from __future__ import annotations

import json
import logging
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest

from atp_extproc.policy import (
    DEFAULT_DENY_ID,
    NO_CANDIDATE_ID,
    CandidateInfo,
    PolicyError,
    PolicySet,
    PolicySettings,
    build_attributes,
)
from atp_extproc.policy.attributes import MAX_STRING
from atp_extproc.policy.engine import evaluation_error
from atp_extproc.policy.runtime import PolicyStore, policy_set_from_config
from atp_extproc.policy.settings import load_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"

SMALL = CandidateInfo("small", "demo_a", "eu", "internal", 0.0001, 0.0002, "demo_a")
LARGE = CandidateInfo("large", "demo_b", "us", "external", 0.003, 0.01, "demo_b")


def P(id_, effect, expression, **kw):
    return {"id": id_, "effect": effect, "expression": expression, **kw}


def compile_(*policies, **settings):
    return PolicySet.compile(list(policies), PolicySettings(**settings))


def attrs(tenant="alice", **request):
    context = request.pop("context", {})
    subject = request.pop("subject", {})
    return build_attributes({"tenant": tenant, "auth_method": "api_key", **subject},
                            request, context)


def rec(outcome, policy_id):
    return next(r for r in outcome.records if r.policy_id == policy_id)


# -- combining ------------------------------------------------------------------------


def test_deny_overrides_allow():
    ps = compile_(P("a.allow_alice", "allow", "subject.tenant == 'alice'"),
                  P("a.no_gpt4o", "deny", "request.alias == 'gpt-4o'",
                    message="not for you"), default="deny")
    out = ps.evaluate(attrs(alias="gpt-4o"), [SMALL])
    assert out.denied is not None
    assert out.denied.policy_id == "a.no_gpt4o"
    assert out.denied.message == "not for you"
    assert rec(out, "a.allow_alice").decision == "allow"
    assert rec(out, "a.no_gpt4o").decision == "deny"
    body = json.loads(out.denied.error_body())
    assert body["error"]["code"] == "policy_denied"
    assert body["error"]["policy_id"] == "a.no_gpt4o"
    assert "not for you (policy a.no_gpt4o)" == body["error"]["message"]


def test_default_deny_needs_an_allow_and_default_allow_does_not():
    allow = P("a.alice", "allow", "subject.tenant == 'alice'")
    deny_ps = compile_(allow, default="deny")
    assert deny_ps.evaluate(attrs("alice"), [SMALL]).denied is None
    out = deny_ps.evaluate(attrs("bob"), [SMALL])
    assert out.denied.policy_id == DEFAULT_DENY_ID
    # The 403 says why (its reasons were empty).
    assert json.loads(out.denied.error_body())["error"]["reasons"] == [
        f"{DEFAULT_DENY_ID}: no enforced allow policy matched, and policy.default is deny"]
    assert rec(out, "a.alice").decision == "no_match"
    allow_ps = compile_(allow, default="allow")
    assert allow_ps.evaluate(attrs("bob"), [SMALL]).denied is None


def test_restrict_narrows_candidates_per_candidate():
    ps = compile_(P("pii.internal", "restrict",
                    "size(request.data_classes) > 0 && resource.egress == 'external'",
                    message="PII stays inside"))
    out = ps.evaluate(attrs(data_classes={"email": 1}), [LARGE, SMALL])
    assert [c.model for c in out.allowed_candidates] == ["small"]
    assert out.denied is None
    r = rec(out, "pii.internal")
    assert r.decision == "restrict" and r.targets == ("large",)
    clean = ps.evaluate(attrs(), [LARGE, SMALL])
    assert [c.model for c in clean.allowed_candidates] == ["large", "small"]
    assert rec(clean, "pii.internal").decision == "allow"


def test_empty_candidate_set_is_403_with_every_reason():
    ps = compile_(P("pii.internal", "restrict", "resource.egress == 'external'",
                    message="external egress is off"),
                  P("res.eu", "restrict", "resource.region != 'eu'", message="EU only"))
    out = ps.evaluate(attrs(), [LARGE])
    assert out.allowed_candidates == ()
    assert out.denied is not None and out.denied.status == 403
    assert out.denied.policy_id == NO_CANDIDATE_ID  # two policies removed it
    assert set(out.empty_candidate_reasons) == {"pii.internal: external egress is off",
                                                "res.eu: EU only"}
    assert "external egress is off" in out.denied.message and "EU only" in out.denied.message
    single = ps.evaluate(attrs(), [SMALL, CandidateInfo("x", region="us", egress="internal")])
    assert [c.model for c in single.allowed_candidates] == ["small"]


def test_empty_set_by_one_policy_names_it():
    ps = compile_(P("pii.internal", "restrict", "resource.egress == 'external'",
                    message="external egress is off"))
    out = ps.evaluate(attrs(), [LARGE])
    assert out.denied.policy_id == "pii.internal"


def test_restrict_without_resource_removes_every_candidate():
    ps = compile_(P("r.stream", "restrict", "request.stream", message="no streams"))
    out = ps.evaluate(attrs(stream=True), [SMALL, LARGE])
    assert out.allowed_candidates == ()
    assert out.denied.policy_id == "r.stream"


def test_no_candidates_given_means_candidate_policies_do_not_apply():
    ps = compile_(P("r.ext", "restrict", "resource.egress == 'external'"))
    out = ps.evaluate(attrs(), [])
    assert out.denied is None
    assert rec(out, "r.ext").decision == "not_applicable"


def test_redact_union_over_allowed_candidates_only():
    ps = compile_(
        P("r.eu", "restrict", "resource.region != 'eu'"),
        P("d.contact", "redact", "resource.egress == 'external' && 'email' in "
          "request.data_classes", data_classes=["email", "phone"]),
        P("d.pay", "redact", "'iban' in request.data_classes", data_classes=["iban"]))
    out = ps.evaluate(attrs(data_classes={"email": 2, "iban": 1}), [LARGE, SMALL])
    # LARGE (external) was removed by r.eu, so its redaction requirement does not apply.
    assert [c.model for c in out.allowed_candidates] == ["small"]
    assert out.required_redactions == {"iban"}
    # Nor does its record claim one: it used to say "redact" for a request sent on
    # with the e-mail unredacted.
    assert rec(out, "d.contact").decision == "not_applicable"
    assert rec(out, "d.contact").reason == "it matched only candidates that restrict removed"
    assert rec(out, "d.pay").decision == "redact"
    wide = compile_(P("d.contact", "redact", "resource.egress == 'external'",
                      data_classes=["email"]))
    assert wide.evaluate(attrs(), [LARGE, SMALL]).required_redactions == {"email"}


def test_a_redact_that_failed_on_a_kept_candidate_keeps_its_error():
    # Its error refused the request: its record must say so, not "not_applicable".
    ps = compile_(P("r.large", "restrict", "resource.model == 'large'"),
                  P("d.red", "redact", "resource.model == 'large' ? true : "
                    "int(request.metadata.n) > 0", data_classes=["email"], on_error="deny"))
    out = ps.evaluate(attrs(data_classes={"email": 1}), [LARGE, SMALL])
    assert out.denied is not None and out.denied.policy_id == "d.red"
    assert rec(out, "d.red").decision == "error"


def test_tools_strip_and_deny():
    ps = compile_(
        P("t.scope", "tools", "subject.tenant == 'bob' && !(tool.name in ['get_weather'])",
          tool_action="strip", message="bob: weather only"),
        P("t.shell", "tools", "tool.name == 'shell'", tool_action="deny",
          message="no shell"))
    tools = [{"name": "get_weather"}, {"name": "calendar"},
             {"name": "history_only", "declared": False, "called": True}]
    out = ps.evaluate(attrs("bob", tool_details=tools), [SMALL])
    assert out.denied is None
    # A tool only in the history cannot be stripped: it is recorded, not removed.
    assert out.tools_to_strip == ("calendar",)
    assert rec(out, "t.scope").decision == "strip"
    assert rec(out, "t.scope").targets == ("calendar", "history_only")
    assert rec(out, "t.shell").decision == "allow"
    out = ps.evaluate(attrs("alice", tool_details=[{"name": "shell"}]), [SMALL])
    assert out.tools_denied == ("shell",)
    assert out.denied.policy_id == "t.shell"
    assert "no shell" in out.denied.message and "shell" in out.denied.message
    # The 403 body's `reasons` names the policy, as for every other refusal.
    assert out.denied.reasons == (f"t.shell: {out.denied.message}",)
    none = ps.evaluate(attrs("alice"), [SMALL])
    assert rec(none, "t.scope").decision == "not_applicable"


def test_each_tools_policy_that_denies_names_its_own_tools():
    # One message pinned every denied tool on the first policy: "no shell (tools:
    # shell, search)", and the other policy's reason was nowhere in the 403.
    ps = compile_(
        P("t.shell", "tools", "tool.name == 'shell'", tool_action="deny", message="no shell"),
        P("t.big", "tools", "tool.name == 'search'", tool_action="deny",
          message="too many results"))
    out = ps.evaluate(attrs("alice", tool_details=[{"name": "shell"}, {"name": "search"}]),
                      [SMALL])
    assert out.denied.policy_id == "t.shell"
    assert out.denied.message == "no shell (tools: shell)"
    assert out.denied.reasons == ("t.shell: no shell (tools: shell)",
                                  "t.big: too many results (tools: search)")
    assert out.tools_denied == ("shell", "search")


def test_a_deny_that_wins_lists_the_tools_policies_that_also_refused():
    # reasons named only the deny policies: the client fixed that and met another 403.
    ps = compile_(P("t.shell", "tools", "tool.name == 'shell'", tool_action="deny",
                    message="no shell"),
                  P("z.deny", "deny", "subject.tenant == 'alice'", message="z denies"))
    out = ps.evaluate(attrs("alice", tool_details=[{"name": "shell"}]), [SMALL])
    assert out.denied.policy_id == "z.deny" and out.denied.message == "z denies"
    assert out.denied.reasons == ("z.deny: z denies", "t.shell: no shell (tools: shell)")
    dry = compile_(P("t.shell", "tools", "tool.name == 'shell'", tool_action="deny",
                     message="no shell", mode="dry_run"),
                   P("z.deny", "deny", "subject.tenant == 'alice'", message="z denies",
                     mode="dry_run"))
    out = dry.evaluate(attrs("alice", tool_details=[{"name": "shell"}]), [SMALL])
    assert out.denied is None
    assert out.would_deny.reasons == ("z.deny: z denies", "t.shell: no shell (tools: shell)")


def test_a_tool_called_in_parallel_is_named_once_in_the_record():
    # Each parallel call is an entry of tool_details: the record said "search, search".
    ps = compile_(P("t.cap", "tools", "tool.name == 'search'", tool_action="deny",
                    mode="dry_run"))
    calls = [{"name": "search", "called": True, "arguments": {"k": str(k)}} for k in (1, 2)]
    out = ps.evaluate(attrs("alice", tool_details=calls), [SMALL])
    assert rec(out, "t.cap").decision == "would_deny"
    assert rec(out, "t.cap").targets == ("search",)


def test_policies_past_one_programs_size_limit_are_joined_into_several():
    # 43 allow-lists of 150 tenants passed cel-cpp's 100,000 code points as one joined
    # program: check and serve refused the config as "<batch>: internal".
    def among(i: int) -> str:
        return "[" + ", ".join(f"'t{i}x{j:03d}'" for j in range(150)) + "]"

    policies = [P(f"req.p{i}", "deny", f"subject.tenant in {among(i)}") for i in range(30)]
    policies += [P(f"cand.p{i}", "restrict", f"resource.model == 'large' && "
                   f"subject.tenant in {among(i)}") for i in range(20)]
    policies += [P(f"tool.p{i}", "tools", f"tool.name == 'shell' && subject.tenant in "
                   f"{among(i)}", tool_action="strip") for i in range(20)]
    ps = compile_(*policies)
    assert len(ps._batches) > 1
    doc = attrs("t7x001", tool_details=[{"name": "shell"}, {"name": "calc"}])
    assert ps.raw_results(doc, [SMALL, LARGE]) == ps.raw_results(doc, [SMALL, LARGE],
                                                                   batch=False)
    out = ps.evaluate(doc, [SMALL, LARGE])
    assert out.denied.policy_id == "req.p7"
    assert rec(out, "cand.p7").decision == "restrict" and out.tools_to_strip == ("shell",)
    assert rec(out, "tool.p7").targets == ("shell",)
    assert ps.evaluate(attrs("t25x009"), [SMALL]).denied.policy_id == "req.p25"
    assert ps.evaluate(attrs("mallory"), [SMALL]).denied is None


def test_a_policy_that_failed_on_one_target_and_matched_another_records_what_it_did():
    # on_error skip: it was recorded as an error, "policy skipped", while it refused the
    # request for the call it matched (or removed the candidate it matched).
    ps = compile_(P("t.cap", "tools", "int(tool.arguments.n) > 5", tool_action="deny",
                    on_error="skip", message="n too big"),
                  P("r.big", "restrict", "resource.model == 'large' ? true : "
                    "int(request.metadata.n) > 0", on_error="skip"))
    calls = [{"name": "calc", "called": True, "arguments": {"n": n}} for n in ("abc", "9")]
    out = ps.evaluate(attrs("alice", tool_details=calls), [LARGE, SMALL])
    assert out.denied is not None and out.denied.policy_id == "t.cap"
    for pid, decision, target in (("t.cap", "deny", "tool"), ("r.big", "restrict",
                                                              "candidate")):
        r = rec(out, pid)
        assert r.decision == decision
        assert f"evaluation error on another {target}" in r.reason
        assert r.reason.endswith("on_error=skip: skipped there")
    assert rec(out, "r.big").targets == ("large",)


def test_tool_arguments_from_history():
    ps = compile_(P("t.args", "tools", "tool.name == 'search' && 'limit' in tool.arguments"
                    " && int(tool.arguments['limit']) > 50", tool_action="deny"))
    ok = ps.evaluate(attrs(tool_details=[{"name": "search", "called": True,
                                         "arguments": {"limit": 10}}]), [SMALL])
    assert ok.denied is None
    bad = ps.evaluate(attrs(tool_details=[{"name": "search", "called": True,
                                          "arguments": {"limit": 99}}]), [SMALL])
    assert bad.denied.policy_id == "t.args"


# -- modes ----------------------------------------------------------------------------


def test_dry_run_deny_is_recorded_counted_apart_and_does_not_block():
    ps = compile_(P("l.max", "deny", "request.max_tokens > 4096", mode="dry_run"),
                  P("l.ctx", "deny", "request.token_estimate > 100000"))
    out = ps.evaluate(attrs(max_tokens=8000), [SMALL])
    assert out.denied is None
    assert out.would_deny is not None and out.would_deny.policy_id == "l.max"
    r = rec(out, "l.max")
    assert (r.decision, r.mode) == ("would_deny", "dry_run")
    ps.evaluate(attrs(max_tokens=10), [SMALL])
    ps.evaluate(attrs(token_estimate=200000), [SMALL])
    snap = ps.stats.snapshot()
    assert snap["requests"] == 3
    assert snap["denied"] == 1 and snap["would_deny"] == 2
    assert snap["policies"]["l.max"] == {"dry_run": {"would_deny": 1, "allow": 2}}
    assert snap["policies"]["l.ctx"] == {"enforce": {"allow": 2, "deny": 1}}


def test_dry_run_restrict_redact_tools_change_nothing():
    ps = compile_(
        P("r.ext", "restrict", "resource.egress == 'external'", mode="dry_run"),
        P("d.all", "redact", "resource.egress == 'external'", data_classes=["email"],
          mode="dry_run"),
        P("t.all", "tools", "tool.name != ''", tool_action="strip", mode="dry_run"))
    out = ps.evaluate(attrs(tool_details=[{"name": "x"}]), [LARGE])
    assert out.denied is None
    assert [c.model for c in out.allowed_candidates] == ["large"]
    assert out.required_redactions == frozenset() and out.tools_to_strip == ()
    assert [rec(out, i).decision for i in ("r.ext", "d.all", "t.all")] == [
        "would_restrict", "would_redact", "would_strip"]
    assert out.would_deny is not None  # enforcing r.ext would empty the candidate set


@pytest.mark.parametrize(("switch", "expect_denied", "modes"), [
    ("per_policy", "c.critical", {"c.critical": "enforce", "c.other": "dry_run"}),
    ("dry_run", None, {"c.critical": "dry_run", "c.other": "dry_run"}),
    ("enforce", "c.critical", {"c.critical": "enforce", "c.other": "enforce"}),
])
def test_global_switch(switch, expect_denied, modes):
    ps = compile_(P("c.critical", "deny", "request.alias == 'x'", mode="enforce"),
                  P("c.other", "deny", "request.alias == 'x'", mode="dry_run"), mode=switch)
    out = ps.evaluate(attrs(alias="x"), [SMALL])
    assert (out.denied.policy_id if out.denied else None) == expect_denied
    assert {r.policy_id: r.mode for r in out.records} == modes
    assert out.would_deny.policy_id == "c.critical"


def test_global_dry_run_also_softens_default_deny():
    ps = compile_(P("a.none", "allow", "subject.tenant == 'nobody'"), default="deny",
                  mode="dry_run")
    out = ps.evaluate(attrs(), [SMALL])
    assert out.denied is None
    assert out.would_deny.policy_id == DEFAULT_DENY_ID


# -- evaluation errors ----------------------------------------------------------------


def test_evaluation_error_denies_by_default():
    ps = compile_(P("e.claim", "deny", "subject.claims.level == 'admin'"))
    out = ps.evaluate(attrs(), [SMALL])  # no claims: key not found
    assert out.denied is not None and out.denied.policy_id == "e.claim"
    r = rec(out, "e.claim")
    assert r.decision == "error"
    assert "on_error=deny" in r.reason


def test_evaluation_error_configurable():
    skip = compile_(P("e.claim", "deny", "subject.claims.level == 'admin'", on_error="skip"))
    out = skip.evaluate(attrs(), [SMALL])
    assert out.denied is None and rec(out, "e.claim").decision == "error"
    apply = compile_(P("e.ext", "restrict",
                       "resource.egress == 'external' && subject.claims.x == 'y'",
                       on_error="apply"))
    out = apply.evaluate(attrs(), [LARGE, SMALL])
    assert [c.model for c in out.allowed_candidates] == ["small"]  # errored on LARGE only
    dry = compile_(P("e.claim", "deny", "subject.claims.level == 'admin'", mode="dry_run"))
    out = dry.evaluate(attrs(), [SMALL])
    assert out.denied is None and out.would_deny.policy_id == "e.claim"


def test_a_dry_run_error_record_says_what_enforcing_would_do():
    # Nothing is applied or skipped under a dry run: the records must not say it was.
    ps = compile_(P("e.deny", "deny", "subject.claims.level == 'admin'"),
                  P("e.skip", "deny", "subject.claims.level == 'x'", on_error="skip"),
                  P("e.apply", "restrict", "resource.model == subject.claims.level",
                    on_error="apply"), mode="dry_run")
    out = ps.evaluate(attrs(), [LARGE, SMALL])
    assert [c.model for c in out.allowed_candidates] == ["large", "small"]
    assert {r.policy_id: r.reason.split("; ", 1)[1] for r in out.records} == {
        "e.deny": "on_error=deny: request would be denied (dry run)",
        "e.skip": "on_error=skip: policy would be skipped (dry run)",
        "e.apply": "on_error=apply: effect would be applied (dry run)"}
    enforced = compile_(P("e.apply", "restrict", "resource.model == subject.claims.level",
                          on_error="apply"))
    assert rec(enforced.evaluate(attrs(), [LARGE, SMALL]), "e.apply").reason.endswith(
        "on_error=apply: effect applied")


def test_the_refusal_of_a_failed_policy_names_it_once():
    out = compile_(P("e.claim", "deny", "subject.claims.level == 'admin'")).evaluate(
        attrs(), [SMALL])
    assert out.denied.client_message() == "Policy could not be evaluated (policy e.claim)"
    assert out.denied.reasons == ("e.claim: Policy could not be evaluated",)


def test_error_in_one_policy_does_not_disturb_the_others():
    ps = compile_(P("e.claim", "deny", "subject.claims.level == 'admin'", on_error="skip"),
                  P("e.ok", "deny", "request.alias == 'x'"),
                  P("e.cand", "restrict", "resource.model == 'large'"))
    out = ps.evaluate(attrs(alias="x"), [LARGE, SMALL])
    assert out.denied.policy_id == "e.ok"
    assert [c.model for c in out.allowed_candidates] == ["small"]


def test_error_text_never_carries_values():
    ps = compile_(P("e.int", "deny", "int(request.alias) > 3"),
                  P("e.key", "deny", "request.metadata[subject.user] == 'x'"))
    out = ps.evaluate(attrs(alias="jane.doe@example.com",
                            subject={"user": "jane.doe@example.com"}), [SMALL])
    text = json.dumps([asdict(r) for r in out.records])
    assert "jane" not in text


def test_error_reasons_are_fixed_phrases_never_runtime_text():
    # cel-cpp's texts carry unquoted values: an index, a numeric map key, RE2's pattern.
    ps = compile_(P("e.index", "deny", "request.tools[request.max_tokens] == 'x'"),
                  P("e.key", "deny", "subject.claims[subject.claims.n] == 1",
                    on_error="skip"),
                  P("e.int", "deny", "int(request.metadata.ssn) > 1"))
    out = ps.evaluate(attrs(tools=["a"], max_tokens=31337, metadata={"ssn": "123-45-6789"},
                            subject={"claims": {"n": 98765}}), [SMALL])
    reasons = {r.policy_id: r.reason for r in out.records}
    assert reasons == {
        "e.index": "evaluation error: UNKNOWN: index error; on_error=deny: request denied",
        "e.key": "evaluation error: NOT_FOUND: key not found in map; on_error=skip: "
                 "policy skipped",
        "e.int": "evaluation error: INVALID_ARGUMENT: string conversion failed; "
                 "on_error=deny: request denied"}
    assert evaluation_error("INVALID_ARGUMENT: invalid regular expression: missing ): "
                            "(jane.doe@example.com") == \
        "INVALID_ARGUMENT: invalid regular expression"
    assert evaluation_error("UNKNOWN: something new: jane.doe@example.com") == \
        "UNKNOWN: evaluation failed"
    assert evaluation_error(RuntimeError("jane.doe@example.com: Key not found in map")) == \
        "ERROR: evaluation failed"


def test_a_regex_built_at_run_time_is_refused():
    # It would let the request choose the regex, and its errors quote the request's text.
    with pytest.raises(PolicyError, match="matches\\(\\) needs a literal pattern"):
        compile_(P("e.re", "deny", "request.alias.matches(request.metadata.pattern)"))
    compile_(P("e.re", "deny", "request.alias.matches('^gpt-[0-9]+$')"))


# -- records --------------------------------------------------------------------------


def test_records_json_attributes_used_and_no_prompt_or_pii():
    ps = compile_(
        P("a.t", "deny", "subject.tenant == 'bob' && request.alias.startsWith('gpt')"),
        P("a.c", "deny", "has(subject.claims.admin) && subject.claims['admin'] == true"),
        P("a.tools", "deny", "request.tool_details.exists(t, t.name == 'x' && t.called)"),
        P("a.r", "restrict", "resource.egress == 'external' && 'email' in "
          "request.data_classes"))
    by_id = {p.id: p.attributes_used for p in ps.policies}
    assert by_id["a.t"] == ("request.alias", "subject.tenant")
    assert by_id["a.c"] == ("subject.claims.admin",)
    assert by_id["a.tools"] == ("request.tool_details", "request.tool_details[].called",
                                "request.tool_details[].name")
    assert by_id["a.r"] == ("request.data_classes", "resource.egress")
    secret = "4111 1111 1111 1111 my email is jane@example.com"
    out = ps.evaluate(attrs(alias=secret, data_classes={"email": 1},
                            metadata={"note": secret}), [LARGE])
    fields = out.log_fields()
    assert set(fields) == {"policy_decisions", "policy_records"}
    assert [r["policy_id"] for r in fields["policy_records"]] == ["a.r"]
    dumped = json.dumps(fields)
    assert "jane" not in dumped and "4111" not in dumped
    # Every record, not only those the log keeps, is free of them.
    dumped = json.dumps([r.as_dict() for r in out.records])
    assert "jane" not in dumped and "4111" not in dumped
    for r in out.records:
        assert r.eval_us >= 0 and r.mode == "enforce"
        assert set(asdict(r)) == {"policy_id", "effect", "mode", "decision", "reason",
                                  "attributes_used", "eval_us", "targets"}


def test_log_fields_keep_every_decision_and_only_the_records_of_policies_that_acted():
    ps = compile_(P("q.allow", "allow", "subject.tenant == 'alice'"),
                  P("q.deny", "deny", "request.max_tokens > 100"),
                  P("q.dry", "deny", "request.max_tokens > 50", mode="dry_run"),
                  P("q.ext", "restrict", "resource.egress == 'external'"))
    quiet = ps.evaluate(attrs("bob", max_tokens=10), [])
    assert quiet.log_fields() == {"policy_decisions": {
        "q.allow": "no_match", "q.deny": "allow", "q.dry": "allow",
        "q.ext": "not_applicable"}, "policy_records": []}
    # An allow policy that matched is what let a request through under default deny:
    # its record is kept, for an audit to name it.
    allowed = ps.evaluate(attrs(max_tokens=10), []).log_fields()
    assert allowed["policy_decisions"]["q.allow"] == "allow"
    (record,) = allowed["policy_records"]
    assert (record["policy_id"], record["decision"]) == ("q.allow", "allow")
    assert record["reason"]
    acted = ps.evaluate(attrs("bob", max_tokens=80), [LARGE, SMALL])
    fields = acted.log_fields()
    assert fields["policy_decisions"] == {"q.allow": "no_match", "q.deny": "allow",
                                          "q.dry": "would_deny", "q.ext": "restrict"}
    assert fields["policy_records"] == [r.as_dict() for r in acted.records
                                        if r.policy_id in ("q.dry", "q.ext")]
    assert fields["policy_records"][1]["targets"] == ["large"]
    json.dumps(fields)


@pytest.mark.parametrize("policies", [
    [P("e.a", "deny", "request.max_tokens > 10", message="too long"),
     P("e.b", "deny", "request.stream", message="no streams")],
    [P("e.tools", "tools", "tool.name != 'ok'", tool_action="deny", message="not ok"),
     P("e.tools2", "tools", "tool.name == 'shell'", tool_action="deny")],
    [P("e.ext", "restrict", "resource.egress == 'external'", message="internal only"),
     P("e.eu", "restrict", "resource.region != 'eu'", message="EU only")],
    [P("e.ext", "restrict", "resource.egress == 'external'", message="internal only")],
    [P("e.allow", "allow", "subject.tenant == 'nobody'")],
], ids=["deny", "tools", "no-candidate", "no-candidate-one", "default-deny"])
def test_would_deny_in_dry_run_is_the_refusal_enforcing_would_give(policies):
    request = attrs(max_tokens=99, stream=True,
                    tool_details=[{"name": "shell"}, {"name": "ok"}, {"name": "a b"}])
    enforced = compile_(*policies, mode="enforce", default="deny")
    dry = compile_(*policies, mode="dry_run", default="deny")
    denied = enforced.evaluate(request, [LARGE]).denied
    out = dry.evaluate(request, [LARGE])
    assert denied is not None and out.denied is None
    assert out.would_deny == denied


def test_tool_names_in_records_are_sanitised():
    ps = compile_(P("t.all", "tools", "tool.name != 'ok'", tool_action="strip"))
    out = ps.evaluate(attrs(tool_details=[{"name": "call me at +1 555 0100"}]), [SMALL])
    assert rec(out, "t.all").targets == ("<tool#0>",)
    assert out.tools_to_strip == ("call me at +1 555 0100",)  # the body edit needs it


def test_a_policy_too_deep_for_the_joined_program_is_named():
    # Fine on its own (28 levels), but the joined program nests it ~7 levels deeper than
    # cel-cpp's 32: the policy is refused with its id, not the whole set as "<batch>".
    chain = "".join(f"request.alias == 'a{i}' ? {1000 + i} : " for i in range(25))
    deep = P("limits.per_alias", "deny", f"({chain}4096) < request.max_tokens")
    with pytest.raises(PolicyError) as info:
        compile_(deep, P("limits.ok", "deny", "request.stream"))
    assert [(d.path, d.file) for d in info.value.details] == [
        ("limits.per_alias", "<policies>")]
    assert "nests too deeply" in info.value.details[0].reason
    shallow = "".join(f"request.alias == 'a{i}' ? {1000 + i} : " for i in range(20))
    compile_(P("limits.per_alias", "deny", f"({shallow}4096) < request.max_tokens"),
             P("limits.tool", "tools", f"({shallow}4096) < size(tool.name)"))


def test_batch_and_single_evaluation_agree_on_examples():
    # The fast path (one program) and the slow path (one per policy) give the same bools.
    from atp_extproc.policy.bench import SHAPES, example_policy_set
    ps = example_policy_set()
    for subject, request, candidates in SHAPES:
        a = build_attributes(subject, request, {"time": "2026-01-01T03:00:00Z"})
        batch = ps.raw_results(a, candidates)
        single = ps.raw_results(a, candidates, batch=False)
        assert batch == single


def test_policy_variable_names_cannot_clash_with_the_joined_program():
    # The joined program binds `a`, `subject`, `request`, `context`, `resource`, `tool`;
    # a policy may reuse any of them as a comprehension variable.
    ps = compile_(
        P("s.a", "deny", "request.tools.exists(a, a == 'x')"),
        P("s.subject", "deny", "request.tools.exists(subject, subject == 'y')"),
        P("s.res", "restrict", "request.tools.exists(resource, resource == 'z') && "
          "resource.model == 'large'"))
    a = attrs(tools=["y", "z"])
    assert ps.raw_results(a, [LARGE, SMALL]) == ps.raw_results(a, [LARGE, SMALL],
                                                                batch=False)
    out = ps.evaluate(a, [LARGE, SMALL])
    assert out.denied.policy_id == "s.subject"


# -- compile / reload -----------------------------------------------------------------


def test_policy_set_from_config_and_store_reload(tmp_path, caplog):
    atp = tmp_path / "atp.yaml"
    (tmp_path / "p").mkdir()
    good = tmp_path / "p" / "team.yaml"
    good.write_text(textwrap.dedent("""\
        policies:
          - id: team.one
            effect: deny
            expression: request.alias == 'x'
        """))
    atp.write_text("policy:\n  include: [p/*.yaml]\n")
    ps, loaded = policy_set_from_config(atp.read_text(), str(atp), base_dir=tmp_path)
    assert [p.id for p in ps.policies] == ["team.one"]
    assert str(good) in " ".join(loaded.files) or "team.yaml" in " ".join(loaded.files)

    store = PolicyStore(atp)
    first = store.current
    assert store.reload() is False  # nothing changed
    good.write_text(good.read_text() + "  - id: team.two\n    effect: deny\n"
                    "    expression: request.alias == 'y'\n")
    assert store.reload() is True
    assert [p.id for p in store.current.policies] == ["team.one", "team.two"]
    assert store.current is not first
    kept = store.current
    good.write_text(good.read_text() + "  - id: team.bad\n    effect: deny\n"
                    "    expression: request.aliass == 'z'\n")
    with caplog.at_level(logging.ERROR, logger="atp.policy"):
        assert store.reload() is False
    assert store.current is kept
    assert any("unknown attribute request.aliass" in str(p) for p in store.last_problems)
    assert "policy reload refused" in caplog.text
    # Counters survive reloads: one DecisionStats per store.
    store.current.evaluate(attrs(alias="x"), [SMALL])
    assert store.stats.snapshot()["denied"] == 1


def test_compile_accepts_specs_and_rejects_bad_ones_all_at_once():
    with pytest.raises(PolicyError) as info:
        PolicySet.compile([P("a.b", "deny", "request.x"), P("a.b", "deny", "true")])
    reasons = " ".join(r for *_, r in info.value.problems)
    assert "unknown attribute request.x" in reasons
    assert "duplicate policy id" in reasons
    assert "constant" in reasons


def test_invalid_spec_mapping_is_a_policy_error():
    with pytest.raises(PolicyError, match=r"policies\[0\]\.effect"):
        PolicySet.compile([{"id": "a.b", "effect": "maybe", "expression": "true"}])


def test_outcome_decisions_without_records():
    ps = compile_(P("a.x", "deny", "request.alias == 'x'"),
                  P("a.y", "allow", "request.alias == 'y'"))
    out = ps.evaluate(attrs(alias="x"), [SMALL])
    assert out.decisions == {"a.x": "deny", "a.y": "no_match"}
    assert [r.decision for r in out.records] == ["deny", "no_match"]


def test_a_repeated_result_pattern_decides_for_each_request_s_own_tools_and_candidates():
    # The same policy results with other tools or other (as many) candidates: what was
    # worked out for the first request must not leak into the next.
    ps = compile_(
        P("t.scope", "tools", "!(tool.name in ['get_weather'])", tool_action="strip"),
        P("r.ext", "restrict", "resource.egress == 'external'"))
    first = ps.evaluate(attrs(tool_details=[{"name": "get_weather"}, {"name": "calendar"}]),
                        [LARGE, SMALL])
    assert first.tools_to_strip == ("calendar",)
    assert first.allowed_candidates == (SMALL,)
    assert rec(first, "r.ext").targets == ("large",)
    other_large = CandidateInfo("other", "p", "us", "external", 0.001, 0.002, "p")
    other_small = CandidateInfo("tiny", "p", "eu", "internal", 0.001, 0.002, "p")
    second = ps.evaluate(attrs(tool_details=[{"name": "get_weather"}, {"name": "shell"}]),
                         [other_large, other_small])
    assert second.tools_to_strip == ("shell",)
    assert second.allowed_candidates == (other_small,)
    assert rec(second, "r.ext").targets == ("other",)
    assert rec(second, "t.scope").targets == ("shell",)
    # Only called in the history: recorded, not stripped.
    third = ps.evaluate(attrs(tool_details=[{"name": "get_weather"},
                                            {"name": "shell", "declared": False}]),
                        [LARGE, SMALL])
    assert third.tools_to_strip == ()
    assert rec(third, "t.scope").decision == "strip"
    assert ps.stats.snapshot()["requests"] == 3


def test_empty_policy_set_allows_everything():
    ps = PolicySet.compile([])
    out = ps.evaluate(attrs(), [SMALL])
    assert out.denied is None and out.records == []
    assert out.allowed_candidates == (SMALL,)


def test_exchange_glue_builds_attributes_and_strips_tools():
    from google.protobuf import struct_pb2

    from atp_extproc.policy.runtime import attributes_for_request, strip_tools
    payload = struct_pb2.Struct()
    payload.update({"sub": "u1", "tenant": "alice", "groups": ["llm-users"],
                    "roles": "reader writer"})
    body = {"model": "gpt-4o-mini", "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}},
                      {"type": "function", "function": {"name": "shell"}}]}
    a = attributes_for_request(tenant="alice", auth_method="jwt", key_id=None,
                               jwt_payload=payload, path="/v1/chat/completions",
                               operation="chat", alias="gpt-4o-mini", body_bytes=400,
                               doc=body, data_classes={"email": 1}, route="chat",
                               environment="prod", request_id="r1", config_version="v")
    assert (a.subject.user, list(a.subject.groups), list(a.subject.roles)) == (
        "u1", ["llm-users"], ["reader", "writer"])
    assert a.subject.claims["tenant"] == "alice"
    assert a.request.token_estimate == 100 and a.request.max_tokens == 50
    assert list(a.request.tools) == ["get_weather", "shell"]
    assert dict(a.request.data_classes) == {"email": 1}
    kept = strip_tools(body, ["shell"])
    assert kept == [{"type": "function", "function": {"name": "get_weather"}}]
    assert strip_tools(body, ["nothing"]) is None


def test_strip_removes_a_tool_by_the_name_policies_saw():
    from atp_extproc.policy.runtime import attributes_for_request, strip_tools
    # Without a name a tool goes by its type, or by "function" when that is no string:
    # stripping must match the same name the policy was shown, or the tool stays.
    nameless = {"type": 5, "function": {"description": "no name"}}
    builtin = {"type": "web_search"}
    weather = {"type": "function", "function": {"name": "get_weather"}}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [nameless, builtin, weather, "not a tool"]}
    a = attributes_for_request(tenant="alice", auth_method="api_key", key_id=None,
                               jwt_payload=None, path="/v1/chat/completions",
                               operation="chat", alias="m", body_bytes=100, doc=body)
    assert list(a.request.tools) == ["function", "web_search", "get_weather"]
    ps = compile_(P("t.weather", "tools", "tool.name != 'get_weather'", tool_action="strip"))
    out = ps.evaluate(a, [SMALL])
    assert out.tools_to_strip == ("function", "web_search")
    assert strip_tools(body, out.tools_to_strip) == [weather, "not a tool"]
    assert strip_tools(body, ["web_search"]) == [nameless, weather, "not a tool"]


def test_strip_removes_a_tool_whose_name_policies_saw_cut():
    from atp_extproc.policy.runtime import attributes_for_request, strip_tools
    long_tool = {"type": "function", "function": {"name": "exfiltrate_" + "x" * 300}}
    weather = {"type": "function", "function": {"name": "get_weather"}}
    body = {"model": "m", "messages": [], "tools": [weather, long_tool]}
    a = attributes_for_request(tenant="bob", auth_method="api_key", key_id=None,
                               jwt_payload=None, path="/v1/chat/completions",
                               operation="chat", alias="m", body_bytes=100, doc=body)
    ps = compile_(P("t.weather", "tools", "tool.name != 'get_weather'", tool_action="strip"))
    out = ps.evaluate(a, [SMALL])
    assert [len(n) for n in out.tools_to_strip] == [MAX_STRING]
    assert strip_tools(body, out.tools_to_strip) == [weather]


def test_example_policies_refuse_what_the_caps_hid():
    # tools.no_code_execution refuses `shell`; hidden as the 65th call of one message it
    # cannot see it, so limits.truncated must.
    from atp_extproc.policy.runtime import attributes_for_request
    ps = PolicySet.compile([p for name in ("tools.yaml", "limits.yaml")
                            for p in load_file(EXAMPLES / name).policies])
    calls = [{"type": "function", "function": {"name": "search_docs", "arguments": "{}"}}
             for _ in range(64)]
    calls.append({"type": "function", "function": {"name": "shell", "arguments": "{}"}})
    a = attributes_for_request(tenant="alice", auth_method="api_key", key_id=None,
                               jwt_payload=None, path="/v1/chat/completions",
                               operation="chat", alias="m", body_bytes=100,
                               doc={"messages": [{"role": "assistant", "tool_calls": calls}]})
    assert "shell" not in a.request.tools
    assert ps.evaluate(a, [SMALL]).denied.policy_id == "limits.truncated"


MCP = {"type": "mcp", "server_label": "deepwiki", "server_url": "https://mcp.example"}
FORCE_MCP = {"type": "mcp", "server_label": "deepwiki", "name": "ask_question"}


@pytest.mark.parametrize(("tools", "choice", "stripped", "expected"), [
    # A forced MCP tool goes with its server, which policies know as "mcp".
    ([MCP, {"type": "function", "name": "f"}], FORCE_MCP, "mcp", "refused"),
    # ... and a function of the same name being stripped leaves it alone.
    ([MCP, {"type": "function", "name": "ask_question"}], FORCE_MCP, "ask_question",
     FORCE_MCP),
    # Chat custom tools go by custom.name, in tools and in tool_choice alike.
    ([{"type": "custom", "custom": {"name": "x"}},
      {"type": "function", "function": {"name": "b"}}],
     {"type": "custom", "custom": {"name": "x"}}, "x", "refused"),
])
def test_tool_choice_follows_the_tool_policies_strip(tools, choice, stripped, expected):
    from atp_extproc.policy.runtime import (
        ForcedToolStripped,
        strip_tools,
        tool_choice_without,
    )

    kept = strip_tools({"tools": tools}, [stripped])
    assert kept is not None and len(kept) == 1
    if expected == "refused":
        with pytest.raises(ForcedToolStripped):
            tool_choice_without(choice, [stripped], True)
    else:
        assert tool_choice_without(choice, [stripped], True) is expected


@pytest.mark.parametrize("name", ["5555555555554444", "536-22-1234", "203.0.113.77",
                                  "x5555555555554444", "ip_1.2.3.4", "tel-555-123-4567"])
def test_a_tool_named_by_a_number_or_an_address_stays_out_of_records(name):
    ps = compile_(P("t.all", "tools", "tool.name != 'ok'", tool_action="strip"))
    out = ps.evaluate(attrs(tool_details=[{"name": "tool_2024_v1"}, {"name": name}]),
                      [SMALL])
    assert rec(out, "t.all").targets == ("tool_2024_v1", "<tool#1>")
