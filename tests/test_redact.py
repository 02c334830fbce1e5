"""Redaction: detectors, normalisation, scope per operation, actions, settings, mapping."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from pydantic import ValidationError

from atp_extproc.redact import (
    BUILTIN_CLASSES,
    PlaceholderMap,
    Redaction,
    RedactionSettings,
    Redactor,
)
from atp_extproc.redact.detectors import card_ok, iban_ok, luhn_ok, ssn_ok
from atp_extproc.redact.normalize import normalize
from tests.conftest import numbered

KEY = b"k" * 32


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(RedactionSettings())


def classes(r: Redactor, text: str) -> list[tuple[str, str]]:
    return [(s.cls, text[s.start:s.end]) for s in r.scan_text(text)]


def fullwidth(text: str) -> str:
    """ASCII letters, digits and punctuation as their fullwidth forms (U+FF01..U+FF5E)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def chat(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def content(res: Redaction, i: int = 0):
    return res.fields["messages"][i]["content"]


# -- detectors: valid and invalid examples ------------------------------------------------

VALID = {
    "email": ["john.doe@example.com", "Jane_Smith+tag@mail.co.uk", "o'neil@x.io".replace(
        "'", ""), "josé.garcía@correo.es", "A.B-C@sub.example-domain.org"],
    "phone": ["+1 415 555 2671", "(415) 555-2671", "415.555.2671", "+44 20 7946 0958",
              "+44(0)121 496 0000", "030 12345678", "+49 (0) 30 1234567", "06 12 34 56 78",
              "+33 6 12 34 56 78", "+61.437.406.812", "090-1234-5678", "+91 98765 43210",
              "+55 11 98765-4321", "206.269.0743x9150", "0049 30 1234567"],
    "ssn": ["123-45-6789", "219-09-9998", "001-01-0001", "899 99 9999"],
    "card": ["4111 1111 1111 1111", "4111-1111-1111-1111", "5555555555554444",
             "2221 0000 0000 0009", "2720 9999 9999 9996", "3782 822463 10005",
             "6011111111111117", "3530111333300000", "30569309025904", "6200000000000005",
             "2200 0000 0000 0004", "6759 6498 2643 8453"],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432",
             "FR1420041010050500013M02606", "NL91ABNA0417164300", "de89370400440532013000",
             "CH9300762011623852957"],
    "ipv4": ["192.168.0.1", "8.8.8.8", "255.255.255.255", "10.0.0.254"],
    "ipv6": ["2001:db8:85a3::8a2e:370:7334", "fe80::1", "2001:0db8:0000:0000:0000:ff00:0042:8329",
             "::ffff:192.0.2.128", "2001:db8::"],
    "cloud_key": ["AKIAIOSFODNN7QWERTYU", "AIzaSyA1234567890abcdefghijklmnopqrstuv",
                  "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", "ya29.a0AfB_byC1d2E3f4G5h6I7j8K9",
                  "Abc8Q~dEfGhIjKlMnOpQrStUvWxYz0123456789"],
    "api_key": ["sk-proj-abc123DEF456ghi789JKL012mno345", "sk-ant-api03-abcdEFGH1234ijklMNOP5678",
                "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
                # Other providers' prefixes, each of which went out in clear.
                "glpat-Ab1Cd2Ef3Gh4Ij5Kl6Mn", "gsk_" + "Ab1Cd2Ef3G" * 5,
                "xai-" + "Ab1Cd2Ef3G" * 8, "pplx-" + "Ab1Cd2Ef3G" * 4 + "Ab1Cd2Ef",
                "r8_" + "Ab1Cd2Ef3G" * 3 + "Ab1Cd2E", "whsec_" + "Ab1Cd2Ef" * 4,
                "SG." + "Ab1Cd2Ef3G" * 2 + "Ab" + "." + "Ab1Cd2Ef3G" * 4 + "Ab1",
                "npm_" + "Ab1Cd2Ef3G" * 3 + "Ab1Cd2", "shpat_" + "0123456789abcdef" * 2,
                "dop_v1_" + "0123456789abcdef" * 4, "123456789:AA" + "Ab1Cd2Ef3G" * 3 + "Ab1",
                "lin_api_" + "Ab1Cd2Ef3G" * 4, "dapi" + "0123456789abcdef" * 2],
    "github_token": ["ghp_abcdefghijklmnopqrstuvwxyz0123456789",
                     "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"],
    "slack_token": ["xoxb-123456789012-1234567890123-abcdefABCDEF",
                    "https://hooks.slack.com/services/T024BE7LD/B01ABCDEF12/aB3dE5gH7jK9mN1pQ3sT5vW7"],
    "jwt": ["eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
            "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"],
    "private_key": ["-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n"
                    "-----END RSA PRIVATE KEY-----",
                    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA",
                    # Armour of four dashes, as retyped.
                    "----BEGIN PRIVATE KEY----\nMIIEpAIBAAKCAQEA7\n----END PRIVATE KEY----",
                    "AGE-SECRET-KEY-1"
                    + "QQPQ4QZ3X5V7X8Q9W0E2R3T4Y5U6Z7L8P9A0S1D2F3G4H5J6K7L8Z23456"],
}

INVALID = {
    "email": ["user@localhost", "@decorator(x)", "a@b.c", "%@example.com", "x@@y.com"],
    "phone": ["(123) 456-7890", "+1 123 456 7890", "2024-01-15 10:30", "Order No. 0612345678",
              "1717171717", "v2.14.3.1", "40.099115, 2.523488", "12 345 678,90 €"],
    "ssn": ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000",
            "123456789", "078-05-1120"],
    "card": ["4111 1111 1111 1112", "7111 1111 1111 1114", "4111111111111111111111",
             "1234 5678 9012 3456", "+4915123455730"],
    "iban": ["DE89 3704 0044 0532 0130 01", "DE89 3704 0044 0532 0130", "XX89370400440532013000",
             "DE00370400440532013000"],
    "ipv4": ["256.1.1.1", "1.2.3", "version 1.2.3.4", "1.2.3.4.5", "01.02.03.04"],
    "ipv6": ["12:30:45", "00:1a:2b:3c:4d:5e", "std::vector", "dead::beef", "::1"],
    # Docs' stand-ins, AWS's EXAMPLE keys among them: refused by secrets policies.
    "cloud_key": ["AKIA1234", "AKIAIOSFODNN7QWERTYUXX", "AKIAXXXXXXXXXXXXXXXX",
                  "AKIAIOSFODNN7EXAMPLE", "AIzaSyXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"],
    "api_key": ["sk-learn", "sk-this-is-not-a-key-at-all", "task-12345678901234567890",
                "glpat-xxxxxxxxxxxxxxxxxxxx", "hf_" + "x" * 34],
    "github_token": ["ghp_" + "x" * 36, "ghp_" + "X" * 36, "github_pat_" + "x" * 60],
    "slack_token": ["xoxb-your-bot-token", "xoxp-your-user-token-here",
                    "https://hooks.slack.com/services/T00000000/B00000000/" + "X" * 24],
    "jwt": ["eyJnotreallyajwt.eyJabcdefghij.abc"],
}


@pytest.mark.parametrize("cls,value", [(c, v) for c, vs in VALID.items() for v in vs])
def test_detects_valid(redactor, cls, value):
    text = f"before {value} after"
    assert classes(redactor, text) == [(cls, value)]


@pytest.mark.parametrize("cls,value", [(c, v) for c, vs in INVALID.items() for v in vs])
def test_ignores_invalid(redactor, cls, value):
    found = classes(redactor, f"before {value} after")
    assert all(c != cls for c, _ in found), found


def test_validators_directly():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert card_ok("4111111111111111") and not card_ok("4111111111111112")
    assert card_ok("2720999999999996")  # Mastercard 2-series, top of the range
    assert not card_ok("2721000000000007")  # just above it: no brand
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
    assert ssn_ok("123", "45", "6789") and not ssn_ok("000", "45", "6789")


def test_context_rules(redactor):
    # A bare 9-digit number is an SSN only when the text says so.
    assert classes(redactor, "SSN: 123456789") == [("ssn", "123456789")]
    # A bare national number after an identifier word is not a phone, after a phone word it is.
    assert classes(redactor, "invoice 0612345678") == []
    assert classes(redactor, "phone number 0612345678") == [("phone", "0612345678")]
    # Unix times are not phone numbers; "+" makes a number international.
    assert classes(redactor, "ts=1717171717") == []
    assert classes(redactor, "call +4915123455730") == [("phone", "+4915123455730")]
    # Identifiers glued to numbers are left alone.
    assert classes(redactor, "see INV-2024-000123 and ORD-4155552671") == []


def test_card_with_cvv_and_phone_together(redactor):
    text = "Card 4111 1111 1111 1111 123, call 415-555-2671"
    assert classes(redactor, text) == [("card", "4111 1111 1111 1111"),
                                       ("phone", "415-555-2671")]


# -- normalisation and exact spans --------------------------------------------------------

EVASIONS = [
    ("email", "john\u200b.doe@exa\u200dmple.com"),
    ("email", fullwidth("john@example.com")),
    ("email", "john\\u0040example.com"),
    ("email", "john&#64;example.com"),
    ("email", "john%40example.com"),
    ("card", fullwidth("4111 1111 1111 1111").replace("\u3000", " ")),
    ("card", "4111\u00a01111\u00a01111\u00a01111"),
    ("card", "4111.1111.1111.1111"),
    ("card", "4111/1111/1111/1111"),
    ("card", "4\u200b111 1111 1111 1\u2060111"),
    ("card", "4\u0332111 1111 1111 1111"),
    ("card", "\u0664\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661"
             "\u0661\u0661\u0661\u0661"),
    ("ssn", "123\u201145\u20116789"),
    ("ssn", "123/45/6789"),
    ("phone", "+44\u00a020\u00a07946\u00a00958"),
    ("phone", "(415)\u2009555\u20132671"),
    ("iban", "DE89\u202f3704\u202f0044\u202f0532\u202f0130\u202f00"),
    ("email", "john@example\u3002com".replace("\u3002", "\uff0e")),
    ("email", "".join(chr(0xE0000 + ord(c)) for c in "ab@cd.com")),
]


@pytest.mark.parametrize("cls,value", EVASIONS)
def test_evasions_replace_exact_original_span(redactor, cls, value):
    before, after = "Über «x» — ", " … ende\u00a0ok"
    res = redactor.redact("chat", chat(before + value + after), "t")
    label = "PRIVATE_KEY" if cls == "private_key" else cls.upper()
    assert content(res) == f"{before}[{label}_1]{after}", content(res)
    assert res.mapping.get(f"[{label}_1]") == value


def test_normalize_offsets_round_trip():
    text = "a\u200bb\uff20c\\u0040d\u0301e&#x40;f"
    norm = normalize(text)
    assert norm.text == "ab@c@de@f"
    # every normalised character maps back inside the original
    for p in range(len(norm.text)):
        s, e = norm.orig_start(p), norm.orig_end(p + 1)
        assert 0 <= s < e <= len(text)
    assert text[norm.orig_start(4):norm.orig_end(5)] == "\\u0040"


def test_ascii_text_is_not_copied():
    text = "plain ascii text " * 10
    assert normalize(text).text is text


# -- placeholders ---------------------------------------------------------------------------

def test_numbering_per_request_and_class(redactor):
    doc = {"model": "m", "messages": [
        {"role": "system", "content": "Contact a@example.com or b@example.com."},
        {"role": "user", "content": "Again A@Example.com, card 4111-1111-1111-1111 "
                                    "(=4111 1111 1111 1111), c@example.com"}]}
    res = redactor.redact("chat", doc, "t")
    assert content(res, 0) == "Contact [EMAIL_1] or [EMAIL_2]."
    assert content(res, 1) == "Again [EMAIL_1], card [CARD_1] (=[CARD_1]), [EMAIL_3]"
    assert res.counts == {"email": 4, "card": 2}
    assert res.mapping.get("[EMAIL_1]") == "a@example.com"
    # A new request starts again at 1.
    assert content(redactor.redact("chat", chat("z@example.com"), "t")) == "[EMAIL_1]"


def test_existing_placeholders_are_not_reused(redactor):
    res = redactor.redact("chat", chat("earlier [EMAIL_1] said, now x@example.com"), "t")
    assert content(res) == "earlier [EMAIL_1] said, now [EMAIL_2]"
    assert "[EMAIL_1]" not in res.mapping


def test_placeholders_written_where_nothing_is_scanned_are_not_reused(redactor):
    # A tool's description is not scanned, but the model reads it: the user's address was
    # numbered [EMAIL_1] beside "Use [EMAIL_1] as the sender", and the answer about the
    # description was restored with the address.
    doc = {**chat("my mail is bob@example.com"), "tools": [{"type": "function", "function": {
        "name": "send", "description": "Use [EMAIL_1] as the sender placeholder"}}]}
    res = redactor.redact("chat", doc, "t", json.dumps(doc))
    assert content(res) == "my mail is [EMAIL_2]"
    assert "[EMAIL_1]" not in res.mapping
    # Written with JSON escapes, it is the same placeholder to the model.
    escaped = json.dumps(doc).replace("[EMAIL_1]", "\\u005bEMAIL\\u005f1]")
    assert "[EMAIL_1]" not in escaped
    assert content(redactor.redact("chat", doc, "t", escaped)) == "my mail is [EMAIL_2]"


@pytest.mark.parametrize("choice", [
    {"type": "function", "function": {"name": "falcon_search"}},
    {"type": "custom", "custom": {"name": "falcon_search"}},
    {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "falcon_search"}}]}},
    # (review: a listed tool without a type, and an MCP entry's names as an object)
    {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"name": "falcon_search"}]}},
    {"type": "allowed_tools", "mode": "auto", "tools": [
        {"type": "mcp", "server_label": "falcon",
         "allowed_tools": {"tool_names": ["falcon_read"], "read_only": True}}]},
])
def test_the_tools_a_choice_names_are_never_scanned(choice):
    # The choice's other fields are read; a name nested in it was redacted too, and then
    # matched no tool (tools are not scanned) nor any policy's strip.
    r = Redactor(RedactionSettings(custom_detectors=[
        {"name": "codename", "pattern": "falcon"}]), hmac_key=KEY)
    doc = {**chat("hi"), "tool_choice": {**choice, "note": "falcon", "falcon_key": 1,
                                         "meta": {"name": "falcon"}, "phone": 4155552671}}
    res = r.redact("chat", doc, "t")
    # Keys, numbers under a phone key, and a `name` of no tool are read as ever.
    assert res.fields["tool_choice"] == {**choice, "note": "[CODENAME_1]",
                                         "[CODENAME_1]_key": 1,
                                         "meta": {"name": "[CODENAME_1]"},
                                         "phone": "[PHONE_1]"}
def test_tool_definitions_named_by_extra_paths_keep_every_name():
    # Scanned whole, a tool's name was redacted: a policy's strip (which matches names)
    # missed it and it reached the provider, and choices and history named no tool.
    r = Redactor(RedactionSettings(extra_paths=["tools", "functions"], custom_detectors=[
        {"name": "codename", "pattern": "falcon"}]), hmac_key=KEY)
    tool = {"type": "function", "function": {
        "name": "falcon_search", "description": "search falcon", "parameters": {
            "type": "object", "required": ["falcon_id"],
            "properties": {"falcon_id": {"type": "string", "description": "a falcon"}}}}}
    mcp = {"type": "mcp", "server_label": "falcon_srv", "allowed_tools": ["falcon_read"]}
    doc = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "function", "name": "falcon_fn", "content": "42"}],
           "tools": [tool, mcp], "functions": [{"name": "falcon_fn", "description": "falcon"}]}
    res = Redactor.redact(r, "chat", doc, "t")
    described = res.fields["tools"][0]["function"]
    assert described["name"] == "falcon_search"
    assert described["description"] == "search [CODENAME_1]"
    assert described["parameters"]["properties"] == {
        "falcon_id": {"type": "string", "description": "a [CODENAME_1]"}}
    assert described["parameters"]["required"] == ["falcon_id"]
    assert res.fields["tools"][1] == mcp
    assert res.fields["functions"] == [{"name": "falcon_fn", "description": "[CODENAME_1]"}]
    assert "messages" not in res.fields  # a function result's name is its function's


@pytest.mark.parametrize("paths", [["tools"], ["tools[*].function"],
                                   ["tools[*].function.parameters"],
                                   ["tools[*].function.parameters.properties"]])
def test_a_schemas_examples_are_read_though_they_have_a_type(paths):
    # An object with a `type` in a schema (an example, a default) was taken for a tool
    # and its name and id went out unread; a function named by its path kept no name.
    r = Redactor(RedactionSettings(extra_paths=paths, custom_detectors=[
        {"name": "codename", "pattern": "falcon"}]), hmac_key=KEY)
    example = {"type": "customer", "name": "falcon jones", "id": "falcon-1",
               "properties": {"falcon_key": "v"}, "required": ["falcon r"]}
    doc = {**chat("hi"), "tools": [{"type": "function", "function": {
        "name": "falcon_search", "parameters": {"type": "object", "properties": {
            "who": {"type": "object", "examples": [example]}}}}}]}
    function = Redactor.redact(r, "chat", doc, "t").fields["tools"][0]["function"]
    assert function["name"] == "falcon_search"
    assert function["parameters"]["properties"]["who"]["examples"] == [
        {"type": "customer", "name": "[CODENAME_1] jones", "id": "[CODENAME_1]-1",
         "properties": {"[CODENAME_1]_key": "v"}, "required": ["[CODENAME_1] r"]}]


def test_doc_not_mutated_and_only_changed_fields(redactor):
    doc = {"model": "m", "temperature": 0.2, "messages": [
        {"role": "user", "content": "mail x@example.com"},
        {"role": "assistant", "content": "ok"}], "user": "u-1"}
    before = copy.deepcopy(doc)
    res = redactor.redact("chat", doc, "t")
    assert doc == before
    assert set(res.fields) == {"messages"}
    assert res.fields["messages"][1] is doc["messages"][1]  # untouched parts are shared


def test_nothing_found_returns_empty(redactor):
    res = redactor.redact("chat", chat("Hello, how are you today? Version 2.14.3."), "t")
    assert res.fields == {} and res.counts == {} and not res.denied and not res.changed


# -- scope: every field a provider sees -----------------------------------------------------

E = "x@example.com"


def _emails_left(obj) -> int:
    return json.dumps(obj).count("example.com")


def test_chat_scope(redactor):
    doc = {"model": "m", "messages": [
        {"role": "system", "content": f"sys {E}"},
        {"role": "developer", "content": [{"type": "text", "text": f"dev {E}"}]},
        {"role": "user", "name": E, "content": [
            {"type": "text", "text": f"see {E}"},
            {"type": "image_url", "image_url": {"url": "https://img.example/a.png"}},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            {"type": "file", "file": {"file_id": "f1"}}]},
        {"role": "assistant", "content": None, "refusal": f"no {E}", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "send", "arguments": json.dumps({"to": E, "n": 1})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"sent_to": E})},
        {"role": "assistant", "function_call": {"name": "f", "arguments": f'{{"a": "{E}"}}'}}],
        "user": E, "metadata": {"note": f"for {E}"}}
    res = redactor.redact("chat", doc, "t")
    assert res.counts == {"email": 10}
    assert res.non_text_parts == 3
    new = {**doc, **res.fields}
    # `user` is keyed (test_redact_defects says why), the rest numbered.
    assert _emails_left(new["messages"]) == 0 and new["user"].startswith("[EMAIL:")
    assert new["metadata"] == {"note": "for [EMAIL_1]"}
    # images keep their URL (not text the model reads as text)
    assert new["messages"][2]["content"][1] == doc["messages"][2]["content"][1]


def redacted_arguments(r: Redactor, raw: str) -> tuple[Redaction, str]:
    """An assistant tool call with arguments `raw`, redacted: (result, arguments sent)."""
    doc = {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": raw}}]}]}
    res = r.redact("chat", doc, "t")
    return res, res.fields["messages"][0]["tool_calls"][0]["function"]["arguments"]


def test_tool_call_arguments_stay_valid_json(redactor):
    raw = ('{\n  "to": "jane@example.com",\n  "cc": ["bob@example.org", 7],\n'
           '  "jane@example.com": true,\n  "note": "card 4111\\u00201111 1111 1111"\n}')
    _, out = redacted_arguments(redactor, raw)
    parsed = json.loads(out)
    # keys are read too: the same address as a key gets the same placeholder
    assert parsed == {"to": "[EMAIL_1]", "cc": ["[EMAIL_2]", 7], "[EMAIL_1]": True,
                      "note": "card [CARD_1]"}
    # formatting around the values is kept byte for byte
    assert out.startswith('{\n  "to": "[EMAIL_1]",\n  "cc": ["[EMAIL_2]", 7],\n')


def test_tool_argument_escapes_are_decoded_and_changed_values_re_encoded(redactor):
    raw = ('{"a": "mail jane\\u0040example.com \\"q\\" caf\\u00e9", "b": ["x\\ny"], '
           '"c": "bob@example.org"}')
    res, out = redacted_arguments(redactor, raw)
    # Changed values are written again (without \u escapes), unchanged ones kept as they were.
    assert out == '{"a": "mail [EMAIL_1] \\"q\\" café", "b": ["x\\ny"], "c": "[EMAIL_2]"}'
    assert res.mapping.get("[EMAIL_1]") == "jane@example.com"


def test_splice_replaces_spans_given_in_any_order():
    from atp_extproc.redact.scope import splice
    assert splice("abcdef", [(4, 5, "E"), (0, 1, "[A]"), (2, 2, "+")]) == "[A]b+cdEf"
    assert splice("abc", []) == "abc"


def test_invalid_tool_arguments_scanned_as_text(redactor):
    _, args = redacted_arguments(redactor, '{"to": "a@b.com')
    assert args == '{"to": "[EMAIL_1]'


def test_pii_split_across_text_parts(redactor):
    doc = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "card 4111 1111"}, {"type": "text", "text": " 1111 1111 ok"}]}]}
    res = redactor.redact("chat", doc, "t")
    parts = res.fields["messages"][0]["content"]
    assert parts[0]["text"] == "card [CARD_1]" and parts[1]["text"] == " ok"


def test_completions_scope(redactor):
    for prompt in (f"hi {E}", [f"a {E}", f"b {E}"]):
        res = redactor.redact("completions", {"model": "m", "prompt": prompt,
                                              "suffix": f"end {E}"}, "t")
        assert _emails_left(res.fields) == 0 and set(res.fields) == {"prompt", "suffix"}
    res = redactor.redact("completions", {"model": "m", "prompt": [1, 2, 3]}, "t")
    assert res.non_text_parts == 1 and not res.fields


def test_embeddings_scope(redactor):
    res = redactor.redact("embeddings", {"model": "m", "input": [f"a {E}", "b", f"{E}"]}, "t")
    assert res.fields["input"] == ["a [EMAIL_1]", "b", "[EMAIL_1]"]
    res = redactor.redact("embeddings", {"model": "m", "input": f"x {E}"}, "t")
    assert res.fields["input"] == "x [EMAIL_1]"
    res = redactor.redact("embeddings", {"model": "m", "input": [[1, 2], [3]]}, "t")
    assert res.non_text_parts == 2


def test_responses_scope(redactor):
    doc = {"model": "m", "instructions": f"inst {E}", "input": [
        {"role": "user", "content": [
            {"type": "input_text", "text": f"hello {E}"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
            {"type": "input_file", "file_data": "JVBERi0x"}]},
        {"type": "function_call", "call_id": "c", "name": "f",
         "arguments": json.dumps({"email": E})},
        {"type": "function_call_output", "call_id": "c", "output": f"sent to {E}"},
        {"role": "assistant", "content": [{"type": "output_text", "text": f"ok {E}"}]}]}
    res = redactor.redact("responses", doc, "t")
    assert res.counts == {"email": 5} and res.non_text_parts == 2
    assert _emails_left(res.fields) == 0
    res = redactor.redact("responses", {"model": "m", "input": f"plain {E}"}, "t")
    assert numbered(res.fields) == {"input": "plain [EMAIL_1]"}


def test_extra_paths():
    r = Redactor(RedactionSettings(extra_paths=("tools[*].function.description", "extra.*",
                                                "messages[*].content")))
    doc = {"model": "m", "messages": [{"role": "user", "content": f"{E}"}],
           "tools": [{"type": "function", "function": {"name": "f", "description": f"to {E}"}}],
           "extra": {"a": [f"{E}", {"b": f"{E}"}]}}
    res = r.redact("chat", doc, "t")
    assert res.counts == {"email": 4}  # the repeated default path is scanned once
    assert res.fields["tools"][0]["function"]["description"] == "to [EMAIL_1]"
    assert res.fields["extra"] == {"a": ["[EMAIL_1]", {"b": "[EMAIL_1]"}]}


def test_data_uri_in_text_is_counted_not_scanned(redactor):
    blob = "data:image/png;base64," + "AKIAIOSFODNN7QWERTYU" * 6 + "=="
    res = redactor.redact("chat", chat(f"see {blob} and {E}"), "t")
    assert res.non_text_parts == 1 and res.counts == {"email": 1}


@pytest.mark.parametrize("text", [
    "use key data:text/plain;base64,AKIAIOSFODNN7QWERTYU and go",
    "card data:a/b;base64,4111111111111111 ok",
])
def test_a_few_words_after_a_data_prefix_are_scanned(redactor, text):
    # Skipped as binary, the prefix hid a key from pii.secrets_never and a card.
    res = redactor.redact("chat", chat(text), "t")
    assert res.non_text_parts == 0 and res.counts


def test_operations_are_the_walked_ones_in_order():
    from atp_extproc.redact import OPERATIONS
    assert OPERATIONS == ("chat", "completions", "embeddings", "responses")


def test_unknown_operation(redactor):
    with pytest.raises(ValueError, match="unknown operation"):
        redactor.redact("images", {}, "t")


# -- actions ------------------------------------------------------------------------------

def test_hash_is_stable_per_tenant_and_differs_across_tenants():
    r = Redactor(RedactionSettings(actions={"email": "hash"}), hmac_key=KEY)
    a1 = content(r.redact("chat", chat(f"{E} and X@EXAMPLE.com"), "acme"))
    a2 = content(r.redact("chat", chat(f"{E}"), "acme"))
    b = content(r.redact("chat", chat(f"{E}"), "globex"))
    token = a2
    assert token.startswith("[EMAIL:") and len(token) == len("[EMAIL:]") + 16
    assert a1 == f"{token} and {token}"  # same value (case-insensitive) → same token
    assert b != token
    # another key gives other tokens
    r2 = Redactor(RedactionSettings(actions={"email": "hash"}), hmac_key=b"z" * 32)
    assert content(r2.redact("chat", chat(E), "acme")) != token


def test_hash_needs_a_key_from_the_environment():
    s = RedactionSettings(actions={"card": "hash"}, hmac_key_env="MY_KEY")
    with pytest.raises(ValueError, match="MY_KEY"):
        Redactor(s, environ={})
    with pytest.raises(ValueError, match="at least 16 bytes") as raised:
        Redactor(s, environ={"MY_KEY": "short"})
    # Unset, hash has no key: the way out is a longer one.
    assert "leave it unset" not in str(raised.value)
    r = Redactor(s, environ={"MY_KEY": "x" * 20})
    assert content(r.redact("chat", chat("4111111111111111"), "t")).startswith("[CARD:")


@pytest.mark.parametrize("settings", [
    {"custom_detectors": [{"name": "employee_id\n", "pattern": "EMP-[0-9]{6}"}]},
    {"hmac_key_env": "MY_KEY\n"},
    {"extra_paths": ["metadata.notes\n"]},
])
def test_a_name_ending_in_a_line_break_is_refused(settings):
    # A YAML block scalar (`name: |`) ends in one: the placeholder [EMPLOYEE_ID\n_1] went
    # out and never came back.
    with pytest.raises(ValidationError) as raised:
        RedactionSettings.model_validate(settings)
    assert raised.value.errors()[0]["type"] == "value_error"


def test_a_short_key_is_refused_where_no_action_is_hash():
    # It was left aside for the process's own key: the Responses placeholders then
    # differed across replicas and restarts, with nothing said.
    s = RedactionSettings(hmac_key_env="MY_KEY")
    with pytest.raises(ValueError, match="MY_KEY holds 13 bytes: a key needs at least 16"):
        Redactor(s, environ={"MY_KEY": "short-key-123"})
    Redactor(s, environ={"MY_KEY": ""})  # set empty, as compose files leave it: unset


def test_deny_and_default_deny_for_private_keys(redactor):
    pem = VALID["private_key"][0]
    res = redactor.redact("chat", chat(f"my key {pem} and {E}"), "t")
    assert res.denied == ("private_key",)
    assert content(res) == "my key [PRIVATE_KEY_1] and [EMAIL_1]"  # masked all the same
    r = Redactor(RedactionSettings(actions={"email": "deny", "private_key": "mask"}))
    res = r.redact("chat", chat(f"my key {pem} and {E}"), "t")
    assert res.denied == ("email",)


def test_disabled_classes():
    r = Redactor(RedactionSettings(disabled_classes=("ipv4", "email")))
    assert classes(r, f"{E} at 10.0.0.1 card 4111111111111111") == [("card", "4111111111111111")]
    off = Redactor(RedactionSettings(enabled=False))
    assert off.redact("chat", chat(E), "t").fields == {}


def test_secret_classes_are_gated_one_by_one():
    aws, gh = "AKIAIOSFODNN7QWERTYU", "ghp_" + "a1" * 18
    text = f"these laws, a task-force, xox and eyJ: {aws} and {gh}"
    assert classes(Redactor(RedactionSettings()), text) == [("cloud_key", aws),
                                                            ("github_token", gh)]
    off = Redactor(RedactionSettings(disabled_classes=("cloud_key",)))
    assert classes(off, text) == [("github_token", gh)]
    # Prose holding the literals secrets start with ("aws" in "laws", "sk-" in "task-").
    assert classes(Redactor(RedactionSettings()), "these laws, a task-force, xox, eyJ") == []


def test_custom_detector():
    s = RedactionSettings(custom_detectors=[
        {"name": "employee_id", "pattern": r"EMP-[0-9]{6}"},
        {"name": "codename", "pattern": r"projekt\s+\p{Lu}\p{Ll}+", "case_insensitive": True}],
        actions={"codename": "deny"})
    r = Redactor(s)
    res = r.redact("chat", chat("EMP-123456 works on PROJEKT Änderung, EMP-123456 again"), "t")
    assert content(res) == "[EMPLOYEE_ID_1] works on [CODENAME_1], [EMPLOYEE_ID_1] again"
    assert res.counts == {"employee_id": 2, "codename": 1} and res.denied == ("codename",)


# -- settings validation --------------------------------------------------------------------

@pytest.mark.parametrize("raw,fragment", [
    ({"custom_detectors": [{"name": "x", "pattern": "(unclosed"}]}, "invalid RE2 pattern"),
    ({"custom_detectors": [{"name": "x", "pattern": "a*"}]}, "matches the empty string"),
    ({"custom_detectors": [{"name": "x", "pattern": r"(a)\1"}]}, "invalid RE2 pattern"),
    ({"custom_detectors": [{"name": "email", "pattern": "x"}]}, "built-in data class"),
    ({"custom_detectors": [{"name": "Bad Name", "pattern": "x"}]}, "lowercase letter"),
    ({"custom_detectors": [{"name": "a", "pattern": "x"}, {"name": "a", "pattern": "y"}]},
     "duplicate name"),
    ({"actions": {"emails": "mask"}}, "unknown data class 'emails'"),
    ({"actions": {"email": "drop"}}, "mask"),
    ({"disabled_classes": ["nope"]}, "unknown data class"),
    ({"hmac_key_env": "not a name!"}, "environment variable name"),
    ({"extra_paths": ["a..b"]}, "malformed path"),
    ({"phone_regions": ["XX"]}, "unknown phone region"),
    ({"hmac_key": "literal"}, "Extra inputs are not permitted"),
])
def test_settings_errors(raw, fragment):
    with pytest.raises(ValidationError) as info:
        RedactionSettings.model_validate(raw)
    assert fragment in str(info.value)


def test_settings_defaults_and_frozen():
    s = RedactionSettings()
    assert s.enabled and not s.restore and s.on_incomplete == "deny"
    assert s.action_for("private_key") == "deny" and s.action_for("email") == "mask"
    assert set(s.classes) == set(BUILTIN_CLASSES)
    with pytest.raises(ValidationError):
        s.enabled = False  # type: ignore[misc]


def test_redactor_rejects_bad_pattern_built_without_validation():
    from atp_extproc.redact.settings import CustomDetector
    det = CustomDetector.model_construct(name="x", pattern="(", case_insensitive=False)
    s = RedactionSettings.model_construct(**{**RedactionSettings().__dict__,
                                             "custom_detectors": (det,)})
    with pytest.raises(ValueError, match="invalid RE2 pattern"):
        Redactor(s)


def test_redactor_rejects_bad_pattern_of_a_disabled_detector():
    from atp_extproc.redact.settings import CustomDetector
    det = CustomDetector.model_construct(name="x", pattern="(", case_insensitive=False)
    s = RedactionSettings.model_construct(**{**RedactionSettings().__dict__,
                                             "custom_detectors": (det,),
                                             "disabled_classes": ("x",)})
    with pytest.raises(ValueError, match="invalid RE2 pattern"):
        Redactor(s)


# -- the mapping never leaks ----------------------------------------------------------------

def test_mapping_hides_values(redactor):
    res = redactor.redact("chat", chat(f"mail {E}"), "t")
    for rendered in (repr(res), str(res), repr(res.mapping), str(res.mapping),
                     f"{res.mapping}", f"{res}"):
        assert "example.com" not in rendered
    with pytest.raises(TypeError):
        pickle.dumps(res.mapping)
    with pytest.raises(TypeError):
        copy.deepcopy(res.mapping)
    with pytest.raises(TypeError):
        json.dumps(res.mapping)
    res.mapping.clear()
    assert len(res.mapping) == 0


def test_placeholder_map_basics():
    m = PlaceholderMap({"[EMAIL_1]": "a@b.com"})
    assert "[EMAIL_1]" in m and list(m) == ["[EMAIL_1]"] and m.get("[X_1]") is None and m
