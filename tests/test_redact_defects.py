"""Regressions: JSON tool results and arguments that Python's json cannot parse though they
are valid JSON (an integer of more than 4300 digits, nesting deeper than the recursion
limit) keep valid JSON when redacted; image URLs are scanned only when extra_paths names
them; cards grouped by spaced dashes, tabs, commas, underscores or line breaks, IPv4
addresses with zero-padded octets, phone numbers in some regions' international formats,
tokens with a non-breaking space inside, PEM keys with lower-case or missing armour
lines, and cards in their groups and keys tagged onto a word by a dash or an underscore
are redacted."""

from __future__ import annotations

import base64
import json
import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from atp_extproc.redact import RedactionSettings, Redactor
from atp_extproc.redact.redactor import JSON_TOO_DEEP
from tests.conftest import numbered

E = "alice@example.com"
BIG = "1" * 5000  # over Python's int conversion limit (4300 digits)


def deep() -> str:
    """Nesting deeper than Python's json parses now: the limit is the recursion limit,
    which a library loaded by other tests (lark, for cel-python) may have raised."""
    n = sys.getrecursionlimit() + 500
    return "[" * n + "]" * n


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(RedactionSettings())


def _loads(text: str) -> Any:
    """Python's json without its two limits, to check the result is JSON."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        return json.loads(text, parse_int=str)
    finally:
        sys.setrecursionlimit(limit)


# Where a JSON text goes in a request, and how to read it back from the redacted fields.
Shape = tuple[str, Callable[[str], dict], Callable[[dict], str]]
SHAPES: list[Shape] = [
    ("chat", lambda raw: {"model": "m", "messages": [
        {"role": "tool", "tool_call_id": "c", "content": raw}]},
     lambda f: f["messages"][0]["content"]),
    ("chat", lambda raw: {"model": "m", "messages": [
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": raw}]}]},
     lambda f: f["messages"][0]["content"][0]["text"]),
    ("chat", lambda raw: {"model": "m", "messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": raw}}]}]},
     lambda f: f["messages"][0]["tool_calls"][0]["function"]["arguments"]),
    ("responses", lambda raw: {"model": "m", "input": [
        {"type": "function_call_output", "call_id": "c", "output": raw}]},
     lambda f: f["input"][0]["output"]),
]


def _redact(r: Redactor, shape: Shape, raw: str) -> str:
    operation, build, read = shape
    res = r.redact(operation, build(raw), "t")
    assert not res.denied
    return numbered(read(res.fields))


@pytest.mark.parametrize("shape", SHAPES)
def test_a_json_text_with_a_huge_integer_is_read_as_json(redactor, shape):
    # It was read as text: the card under its key became an unquoted [CARD_1].
    raw = f'{{"n": {BIG}, "card": 4111111111111111, "note": "mail {E}"}}'
    assert _redact(redactor, shape, raw) == (
        f'{{"n": {BIG}, "card": "[CARD_1]", "note": "mail [EMAIL_1]"}}')


def test_a_key_renamed_beside_a_huge_integer(redactor):
    # Renamed keys are checked for collisions by parsing the result: that must not fail.
    raw = f'{{"n": {BIG}, "{E}": 1}}'
    assert _redact(redactor, SHAPES[0], raw) == f'{{"n": {BIG}, "[EMAIL_1]": 1}}'


@pytest.mark.parametrize("shape", SHAPES)
def test_a_json_text_too_deep_to_parse_is_refused(redactor, shape):
    # Read as text, "\n4111..." would be read "n4111..." (no card found) and its
    # placeholders would break the JSON: it cannot be checked, so it does not go.
    raw = f'{{"d": {deep()}, "note": "x\\n4111111111111111 and\\n{E}"}}'
    operation, build, _ = shape
    assert redactor.redact(operation, build(raw), "t").denied == (JSON_TOO_DEEP,)


def test_a_text_that_is_no_json_is_still_read_as_text(redactor):
    raw = "{not json: 4111111111111111, " + E
    assert _redact(redactor, SHAPES[0], raw) == "{not json: [CARD_1], [EMAIL_1]"


# -- image URLs -----------------------------------------------------------------------------

URL = f"https://img.example/a.png?owner={E}"
DATA = "data:image/png;base64," + "QUJD" * 100


def _images(operation: str) -> dict:
    if operation == "chat":
        return {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": URL}},
            {"type": "image_url", "image_url": {"url": DATA}}]}]}
    return {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": URL}, {"type": "input_image", "image_url": DATA}]}]}


@pytest.mark.parametrize("operation", ["chat", "responses"])
def test_image_urls_are_not_scanned_by_default(redactor, operation):
    # The provider fetches them: a placeholder would break the fetch (README, Redaction).
    res = redactor.redact(operation, _images(operation), "t")
    assert not res.fields and res.non_text_parts == 2


@pytest.mark.parametrize("operation", ["chat", "responses"])
def test_extra_paths_scan_image_urls(operation):
    r = Redactor(RedactionSettings(extra_paths=(
        "messages[*].content[*].image_url.url", "input[*].content[*].image_url")))
    res = r.redact(operation, _images(operation), "t")
    fields = numbered(res.fields)
    if operation == "chat":
        urls = [p["image_url"]["url"] for p in fields["messages"][0]["content"]]
    else:
        urls = [p["image_url"] for p in fields["input"][0]["content"]]
    assert urls == ["https://img.example/a.png?owner=[EMAIL_1]", DATA]


# -- detector gaps ---------------------------------------------------------------------------


def _chat_text(r: Redactor, text: str) -> str:
    res = r.redact("chat", {"model": "m", "messages": [{"role": "user", "content": text}]},
                   "t")
    assert not res.denied
    return res.fields["messages"][0]["content"] if res.fields else text


@pytest.mark.parametrize("card", [
    "4111 - 1111 - 1111 - 1111", "4111 -1111- 1111 -1111", "5555 - 5555 - 5555 - 4444",
    "3782 - 822463 - 10005", "4111  -1111-  1111 - 1111"])
def test_a_card_grouped_by_spaced_dashes_is_redacted(redactor, card):
    assert _chat_text(redactor, f"pay with {card} today") == "pay with [CARD_1] today"


@pytest.mark.parametrize("text", [
    "pay with 4111 - 1111 - 1111 - 1112 today",  # fails the Luhn check
    "pay with 4111 -- 1111 -- 1111 -- 1111 today",  # a dash run is no grouping
    "pay with 4111  -  1111  -  1111  -  1111 today",  # a gap wider than a grouping
])
def test_spaced_dash_near_misses_are_not_cards(redactor, text):
    assert _chat_text(redactor, text) == text


@pytest.mark.parametrize("ip", ["010.001.002.003", "192.168.001.010", "10.000.000.001",
                                "172.016.254.001"])
def test_an_ipv4_address_with_zero_padded_octets_is_redacted(redactor, ip):
    assert _chat_text(redactor, f"host {ip} is down") == "host [IPV4_1] is down"


@pytest.mark.parametrize("text", [
    "host 01.02.03.04 is down",  # padded to two digits: a date or a version
    "host 256.001.002.003 is down",  # an octet over 255
    "host 192.168.001.0100 is down",  # padded past three digits
    "version 010.001.002.003 is out",  # a version, as without the zeros
])
def test_zero_padded_near_misses_are_not_addresses(redactor, text):
    assert _chat_text(redactor, text) == text


@pytest.mark.parametrize("phone", [
    "+375 152 45-09-11",  # Belarus
    "+993 12 34-56-78",  # Turkmenistan
    "+687 20.12.34",  # New Caledonia
    "+597 56-12-34",  # Suriname
    "+688 90 1234",  # Tuvalu: was an SSN, "+" and all
    "+886 70 1234 5678",  # Taiwan: was an SSN, "5678" left over
    "+672-10-6609",  # Norfolk Island
    "+247.40123",  # Ascension
    "+591.71234567",  # Bolivia
])
def test_international_formats_are_redacted_as_phone_numbers(redactor, phone):
    assert _chat_text(redactor, f"call {phone} now") == "call [PHONE_1] now"


@pytest.mark.parametrize("text,expected", [
    ("id 375 152 45-09-11 ok", "id 375 152 45-09-11 ok"),  # no '+': the date stays apart
    ("call +1 415 555 2671 12-05-24", "call [PHONE_1] 12-05-24"),
    ("at +49.243400, +14.704285", "at +49.243400, +14.704285"),  # coordinates
    ("at +40.099115", "at +40.099115"),
    ("SSN 123-45-6789", "SSN [SSN_1]"),
])
def test_phone_near_misses_stay(redactor, text, expected):
    assert _chat_text(redactor, text) == expected


@pytest.mark.parametrize("text, expected", [
    ("write ivan.petrov@почта.рф now", "write [EMAIL_1] now"),
    ("write иван.петров@почта.рф now", "write [EMAIL_1] now"),
    ("Ελένη@παράδειγμα.ελ hi", "[EMAIL_1] hi"),
    ("mail 张伟@公司.中国", "mail [EMAIL_1]"),
    ("ivan@ex\u0430mple.com ok", "[EMAIL_1] ok"),  # a Cyrillic a among Latin letters
    ("user@例子.测试 ok", "[EMAIL_1] ok"),
    # The ideographic full stop a CJK keyboard types: a dot in a domain (UTS #46).
    ("mail 张伟@公司\u3002中国", "mail [EMAIL_1]"),
    ("请发到 zhang.wei@company\u3002com 谢谢", "请发到 [EMAIL_1] 谢谢"),
])
def test_an_address_in_any_script_is_redacted(redactor, text, expected):
    # Addresses stopped at the first non-Latin letter: none of these was found.
    assert _chat_text(redactor, text) == expected


@pytest.mark.parametrize("text, expected", [
    ("请联系alice@example.com谢谢", "请联系[EMAIL_1]谢谢"),  # no spaces around it in CJK
    ("请联系alice@example.com\u3002谢谢", "请联系[EMAIL_1]\u3002谢谢"),  # a sentence's end
    ("今天天气很好\u3002明天见\u3002", "今天天气很好\u3002明天见\u3002"),
    ("价格@3.5元", "价格@3.5元"),
    ("用户@服务器", "用户@服务器"),
])
def test_an_address_keeps_its_cjk_neighbours(redactor, text, expected):
    assert _chat_text(redactor, text) == expected


def test_a_field_that_only_starts_like_a_data_url_is_read(redactor):
    # A string beginning "data:...;base64," was skipped whole, whatever followed.
    res = redactor.redact("chat", {"model": "m", "messages": [
        {"role": "assistant", "content": "ok",
         "reasoning_content": "data:text/plain;base64, the user is jane@example.com"}]}, "t")
    assert res.fields["messages"][0]["reasoning_content"] == \
        "data:text/plain;base64, the user is [EMAIL_1]"


PAYLOAD = base64.b64encode(bytes(range(256)) * 2).decode()


@pytest.mark.parametrize("operation,part,read", [
    ("chat", {"type": "file", "file": {"file_data": "{}", "filename": "f.pdf"}},
     lambda f: f["messages"][0]["content"][0]["file"]["file_data"]),
    ("chat", {"type": "input_audio", "input_audio": {"data": "{}", "format": "wav"}},
     lambda f: f["messages"][0]["content"][0]["input_audio"]["data"]),
    ("chat", {"type": "image_url", "image_url": {"url": "{}"}},
     lambda f: f["messages"][0]["content"][0]["image_url"]["url"]),
    ("responses", {"type": "input_file", "file_data": "{}"},
     lambda f: f["input"][0]["content"][0]["file_data"]),
])
def test_a_data_urls_parameters_are_read_and_its_payload_is_kept(redactor, operation, part,
                                                                 read):
    # The media type's parameters (a file's name) were sent unread with the payload;
    # then those after a comma in a quoted one.
    url = f'data:application/pdf;filename=jane.doe@example.com.pdf;note="a,4111111111111111"' \
          f";base64,{PAYLOAD}"
    part = json.loads(json.dumps(part).replace('"{}"', json.dumps(url)))
    key = "messages" if operation == "chat" else "input"
    res = redactor.redact(operation, {"model": "m", key: [
        {"role": "user", "content": [part]}]}, "t")
    sent = read(res.fields)
    assert "jane.doe@example.com" not in sent and "4111111111111111" not in sent
    assert sent.startswith("data:application/pdf;filename=")
    assert sent.endswith(f";base64,{PAYLOAD}")
    assert res.counts == {"email": 1, "card": 1}


# -- cards in other groupings, tokens split by soft spaces, partial PEM keys ----------------


@pytest.mark.parametrize("card", [
    "4111\t1111\t1111\t1111", "4111,1111,1111,1111", "4111_1111_1111_1111",
    "4111\r\n1111\r\n1111\r\n1111", "4111\n1111\n1111\n1111", "5555,5555,5555,4444",
    "3782\t822463\t10005", "3782,822463,10005", "3782_822463_10005"])
def test_a_card_grouped_by_tabs_commas_underscores_or_line_breaks_is_redacted(redactor, card):
    # Digit runs join groups by spaces, dashes, dots and slashes only: these went through.
    assert _chat_text(redactor, f"pay with {card} today") == "pay with [CARD_1] today"


def test_a_card_in_another_grouping_gets_the_same_placeholder(redactor):
    text = "4111,1111,1111,1111 is 4111111111111111"
    assert _chat_text(redactor, text) == "[CARD_1] is [CARD_1]"


@pytest.mark.parametrize("text", [
    "total 1,234,567 and 1,234,5678,9012",  # thousands separators
    "pay with 4111,1111,1111,1112 today",  # fails the Luhn check
    "row 1234,4111,1111,1111,1111 end",  # a further group before: a list of numbers
    "row 4111,1111,1111,1111,2027 end",  # ... or after
    "rows\n9999\n4111\n1111\n1111\n1111\n",
    "pay with 4111\t1111,1111\t1111 today",  # more than one kind of separator
    "pay with 4111, 1111, 1111, 1111 today",  # a list written with ', '
    "amount 4111,1111,1111,1111.50 due",  # a decimal number
    "id_4111_1111_1111_1111 and x4111_1111_1111_1111",  # part of an identifier
    "pay with 4111,111,1111,11111 today",  # not a card's grouping
])
def test_other_grouping_near_misses_are_not_cards(redactor, text):
    assert _chat_text(redactor, text) == text


GH = "ghp_" + "a1B2c3D4e5" * 3 + "F6g7H8"


@pytest.mark.parametrize("token", [
    GH[:14] + "\u00a0" + GH[14:],  # NBSP
    GH[:20] + "\u202f" + GH[20:],  # narrow NBSP
    GH[:9] + "\u3000" + GH[9:29] + "\u2007" + GH[29:],  # ideographic and figure spaces
    GH[:30] + "\u00a0\u00a0" + GH[30:],
    GH[:2] + "\u00a0" + GH[2:],  # inside the prefix
    GH[:14] + "&#160;" + GH[14:],  # escaped
    GH[:14] + "\\u00a0" + GH[14:],
])
def test_a_token_with_a_soft_space_inside_is_redacted(redactor, token):
    # NBSP and the other space separators became ' ', a word break, so the token was cut
    # in two pieces too short to be found (or its tail was left); a zero-width space was
    # always taken out.
    assert _chat_text(redactor, f"token {token} and {GH}") == (
        "token [GITHUB_TOKEN_1] and [GITHUB_TOKEN_1]")


def test_a_token_whose_head_alone_looks_complete_is_redacted_whole(redactor):
    pat = "github_pat_" + "11ABCDEFG0" * 2 + "ab_" + "xY9" * 19 + "zz"
    # The head matched on its own, and the tail after the NBSP went through.
    assert _chat_text(redactor, f"pat {pat[:60]}\u00a0{pat[60:]} and {pat}") == (
        "pat [GITHUB_TOKEN_1] and [GITHUB_TOKEN_1]")


def test_a_soft_space_before_a_split_token_stays(redactor):
    text = f"Voici\u00a0{GH[:10]}\u00a0{GH[10:]}\u00a0!"
    assert _chat_text(redactor, text) == "Voici\u00a0[GITHUB_TOKEN_1]\u00a0!"


def test_an_api_key_with_a_soft_space_inside_is_redacted(redactor):
    key = "sk-proj-abc123DEF456ghi789JKL012mno345"
    assert _chat_text(redactor, f"key {key[:12]}\u00a0{key[12:]}") == "key [API_KEY_1]"


@pytest.mark.parametrize("text", [
    "Prix\u00a0: 10\u00a0000\u00a0€, Louis\u00a0XIV, M.\u00a0Dupont",
    "tokens start with ghp_\u00a0followed by 36 characters",
    f"{GH[:14]} {GH[14:]}",  # an ordinary space: two words, neither a token
])
def test_soft_space_near_misses_stay(redactor, text):
    assert _chat_text(redactor, text) == text


_KEY_BODY = "\n".join(textwrap.wrap(base64.b64encode(bytes(range(256)) * 3).decode(), 64))


def _key_text(r: Redactor, text: str) -> str:
    res = r.redact("chat", {"model": "m", "messages": [{"role": "user", "content": text}]},
                   "t")
    assert res.denied == ("private_key",)  # refused, and masked all the same
    return res.fields["messages"][0]["content"]


@pytest.mark.parametrize("begin, end", [
    ("-----begin rsa private key-----", "-----end rsa private key-----"),
    ("-----begin private key-----", "-----END PRIVATE KEY-----"),
    ("-----Begin Openssh Private Key-----", "-----End Openssh Private Key-----"),
])
def test_a_key_with_lower_case_armour_is_found(redactor, begin, end):
    text = f"my key:\n{begin}\n{_KEY_BODY}\n{end}\nthanks"
    assert _key_text(redactor, text) == "my key:\n[PRIVATE_KEY_1]\nthanks"


@pytest.mark.parametrize("end", ["-----END RSA PRIVATE KEY-----", "-----end private key-----",
                                 "-----END EC PRIVATE KEY-----"])
def test_a_key_without_its_begin_line_is_found(redactor, end):
    # A paste cut at the top: the key lines before the END line went through.
    text = f"the rest of it:\n{_KEY_BODY}\n{end}\nthanks"
    assert _key_text(redactor, text) == "the rest of it:\n[PRIVATE_KEY_1]\nthanks"
    escaped = "rest: " + f"{_KEY_BODY}\n{end}".replace("\n", "\\n") + " ok"
    assert _key_text(redactor, escaped) == "rest: [PRIVATE_KEY_1] ok"


@pytest.mark.parametrize("text", [
    f"cert:\n{_KEY_BODY}\n-----END CERTIFICATE-----",
    f"pub:\n{_KEY_BODY}\n-----END PUBLIC KEY-----",
    "a key file ends with the line\n-----END PRIVATE KEY-----\nand nothing after it",
    "-----begin of the private key section-----",
])
def test_pem_near_misses_are_not_private_keys(redactor, text):
    assert _chat_text(redactor, text) == text


@pytest.mark.parametrize(("text", "want"), [
    ("ref-4111-1111-1111-1111 please", "ref-[CARD_1] please"),
    ("cc_3782-822463-10005.", "cc_[CARD_1]."),  # Amex: 4-6-5
    ("x_sk-proj-abc123DEF456ghi789JKL012mno345", "x_[API_KEY_1]"),
    # An SSN in its groups, where a word names it: the run was an identifier's.
    ("ssn_536-22-1234", "ssn_[SSN_1]"),
    ("user_ssn_536-22-1234 on file", "user_ssn_[SSN_1] on file"),
])
def test_cards_and_keys_tagged_onto_a_word_are_redacted(redactor, text, want):
    assert _chat_text(redactor, text) == want


@pytest.mark.parametrize("text", [
    "INV-2024-0042 and order-4111111111111112",
    # A bare number tagged so is an id: one in ten passes Luhn and a brand's range.
    "req-4111111111111111, fb_100004111111111, run-378282246310005",
    "v1.4111111111111111, 0.4111111111111111",  # a version, a decimal
    "task-force-2024-alpha-beta-gamma-delta",
    "phone_4155552671 is a column",
    "id_536-22-1234 and PRJ-536-22-1234",  # nothing names an SSN
])
def test_ids_tagged_onto_a_word_stay(redactor, text):
    assert _chat_text(redactor, text) == text


@pytest.mark.parametrize(("text", "want"), [
    ("statement-jane.doe@example.com.pdf", "[EMAIL_1].pdf"),
    ("Write to jane.doe@example.com.Thanks in advance",
     "Write to [EMAIL_1].Thanks in advance"),
    ("jane@mail.example.co.uk and Jane.Doe@Example.Com", "[EMAIL_1] and [EMAIL_2]"),
    ("jane@example.zip", "[EMAIL_1]"),  # a top-level domain, though files end so too
])
def test_a_file_extension_or_the_next_sentence_is_no_part_of_an_address(
        redactor, text, want):
    assert _chat_text(redactor, text) == want


@pytest.mark.parametrize("head", [
    "DATA:image/png;base64,",
    "data:image/png;" + ";".join(f"p{i}=v" for i in range(9)) + ";base64,",
    'data:image/png;name="' + "n" * 300 + '";base64,'])
def test_a_data_url_in_any_letter_case_or_with_many_parameters_is_data(redactor, head):
    # Its payload was read as text, and a key-shaped run in random base64 refused a picture.
    payload = PAYLOAD[:300] + "/AKIAIOSFODNN7QWERTYU/" + PAYLOAD[:300]
    res = redactor.redact("chat", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": head + payload}}]}]}, "t")
    assert res.counts == {}
    assert res.fields == {} or res.fields["messages"][0]["content"][0]["image_url"][
        "url"] == head + payload


@pytest.mark.parametrize("call", [
    {"id": "c1", "name": "f", "arguments": '{"e": "jo.doe@example.com"}'},  # flattened
    {"id": "c1", "type": "mcp", "arguments": "mail jo.doe@example.com"},
    {"id": "c1", "type": "function", "arguments": "jo.doe@example.com"},
    {"type": "function", "function": {"name": "f", "arguments": "{}"},
     "note": "jo.doe@example.com"},
    # A function or custom that is no object.
    {"id": "c1", "type": "function", "function": "mail jo.doe@example.com"},
    {"id": "c1", "type": "function", "function": ["mail jo.doe@example.com"]},
    {"id": "c1", "type": "custom", "custom": "mail jo.doe@example.com"},
])
def test_a_tool_call_of_three_other_keys_is_read(redactor: Redactor, call: dict) -> None:
    # Calls of at most three keys with a string id were taken for the usual shape and
    # read in their `function` alone: these went to the provider unread.
    doc = {"messages": [{"role": "assistant", "tool_calls": [call]}]}
    res = redactor.redact("chat", doc, "t")
    assert res.counts == {"email": 1}
    assert "jo.doe@example.com" not in json.dumps(res.fields)


@pytest.mark.parametrize(("file_url", "found"), [
    ("https://files.example.com/q3-report.pdf", {}),  # fetched by the provider: unread
    ("data:application/pdf;filename=jo.doe@example.com.pdf;base64," + "QUJD" * 100,
     {"email": 1}),
    ("data:text/plain,card 4111 1111 1111 1111", {"card": 1}),
    ("mail jo.doe@example.com", {"email": 1}),
])
def test_an_input_files_url_is_read_as_an_images_is(redactor: Redactor, file_url: str,
                                                    found: dict) -> None:
    # file_url was skipped as an id: a data: URL's file name, or text, went out unread.
    doc = {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_url": file_url}]}]}
    assert redactor.redact("responses", doc, "t").counts == found


@pytest.mark.parametrize("number", [442079460958, 4930901820, 919876543210, 61412345678,
                                    4915123456789])
def test_a_phone_keys_number_with_its_country_code_is_a_phone(redactor: Redactor,
                                                              number: int) -> None:
    # Only a US or Canadian number was read so: a British, German, Indian or
    # Australian one under a `phone` key went out as it came (a German mobile as a card).
    doc = {"input": [{"type": "function_call_output", "call_id": "c",
                      "output": {"phone": number}}]}
    assert redactor.redact("responses", doc, "t").counts == {"phone": 1}
    # A few words or signs may stand between the word and the number: a JSON record
    # pasted as text, or prose, went out as it came.
    for text in (f"Tel {number}", f'record {{"phone": "{number}"}}', f"my phone is {number}",
                 f"Phone (mobile): {number}"):
        prose = {"messages": [{"role": "user", "content": text}]}
        assert redactor.redact("chat", prose, "t").counts == {"phone": 1}, text
    # Without a phone word right before it, it is a number like any other ("dial" in
    # "cordial", "reach" in "outreach" are none).
    for text in (f"order {number} shipped", f"outreach campaign {number}",
                 f"cordial greetings, tracking {number}"):
        plain = {"messages": [{"role": "user", "content": text}]}
        assert redactor.redact("chat", plain, "t").counts in ({}, {"card": 1}), text


@pytest.mark.parametrize("operation", ["chat", "completions", "embeddings"])
def test_end_user_fields_get_a_keyed_placeholder_per_tenant(operation: str) -> None:
    # Numbered per request, alice's ann@ and bob's zed@ were both `[EMAIL_1]` at the
    # provider (one user to its abuse checks and caches), and ann@ another one in a
    # request whose text held an e-mail too.
    r = Redactor(RedactionSettings(), hmac_key=b"k" * 32)
    body = {"chat": {"messages": [{"role": "user", "content": "mail x@example.org"}]},
            "completions": {"prompt": "mail x@example.org"},
            "embeddings": {"input": "mail x@example.org"}}[operation]

    def sent(tenant: str, user: str) -> dict:
        doc = {**body, "user": user, "safety_identifier": user, "prompt_cache_key": user}
        return r.redact(operation, doc, tenant).fields

    ann, zed, ann_again = (sent("alice", "ann@example.com"), sent("bob", "zed@example.com"),
                           sent("alice", "ann@example.com"))
    assert ann["user"].startswith("[EMAIL:") and ann["user"] == ann["safety_identifier"]
    assert ann["user"] != zed["user"] and ann["user"] == ann_again["user"]
    assert sent("bob", "ann@example.com")["user"] != ann["user"]  # keyed per tenant


def test_a_hash_key_that_is_no_utf8_is_taken_as_its_bytes() -> None:
    # Random bytes from a Secret reach os.environ with surrogates: check and serve
    # refused every config ("'utf-8' codec can't encode character '\udce9'").
    raw = bytes(range(200, 220))
    settings = RedactionSettings(actions={"email": "hash"})
    r = Redactor(settings, environ={settings.hmac_key_env: os.fsdecode(raw)})
    same = Redactor(settings, hmac_key=raw)
    doc = {"messages": [{"role": "user", "content": "mail jo.doe@example.com"}]}
    assert r.redact("chat", doc, "t").fields == same.redact("chat", doc, "t").fields


@pytest.mark.parametrize(("text", "found"), [
    ("Call me on +1 415 555 0132.Thanks!", {"phone": 1}),
    ("My SSN is 123-45-6789.Thanks", {"ssn": 1}),
    ("card number 4111-1111-1111-1111.Thanks", {"card": 1}),
    ("Tel.415-555-0132", {"phone": 1}),
    # A file name, a version, an id: still parts of a word.
    ("build 4155550132.tar", {}),
    ("hotel.4155550132", {}),
    ("v1.4155550132.Final", {}),
])
def test_a_full_stop_that_starts_a_sentence_or_ends_a_label_ties_no_number(
        redactor: Redactor, text: str, found: dict) -> None:
    # A sentence typed without a space after its full stop, or "Tel." glued to the
    # number, made the number part of an identifier: it went out unmasked.
    doc = {"messages": [{"role": "user", "content": text}]}
    assert redactor.redact("chat", doc, "t").counts == found


def test_lines_of_keys_are_text_and_wrapped_base64_is_data(redactor: Redactor) -> None:
    # Lines of 60-80 base64 characters were taken for wrapped data whatever their widths:
    # AWS key pairs (61 wide) and tokens in a nested field went out unread.
    import base64
    import random

    pair = "AKIAIOSFODNN7QWERTYU/wJalrXUtnFEMI/K7MDENG/bPxRfiCYQWERTYUKEY"
    keys = "\n".join([pair] * 5)
    rng = random.Random(1)
    data = base64.encodebytes(rng.randbytes(600)).decode()  # wrapped at 76
    data = data[:10] + "AKIAIOSFODNN7QWERTYU" + data[30:]   # a key-shaped run in it

    def found(text: str) -> dict:
        doc = {"input": [{"type": "shell_call_output", "call_id": "c",
                          "output": [{"stdout": text}]}]}
        return redactor.redact("responses", doc, "t").counts

    assert found(keys) == {"cloud_key": 5}
    assert found(data) == {}


@pytest.mark.parametrize(("text", "found"), [
    ("Card 4111 1111 1111 1111 2x charged, refund one", {"card": 1}),
    ("SSN 123-45-6789 1st on the form", {"ssn": 1}),
    ("Call 415-555-2671 9am-5pm", {"phone": 1}),
    ("call log: 2024-05-01 10:30:00 415-555-2671 00:02:31", {"phone": 1}),
    ("2024-05-01 10:30:00 4111111111111111 DECLINED 1,234.00 USD", {"card": 1}),
    ("Call 415-555-2671 1,234 times", {"phone": 1}),
    # A first group glued to a word is the run's own prefix: money here.
    ("qty 343 x CHF28 603 650 817 = kr 60", {}),
    # A group tagged with a word by a dash, a slash or an underscore is the value's own.
    ("ref-4111 1111 1111 1111", {"card": 1}),
    ("amex-3782 822463 10005", {"card": 1}),
    ("5500 0000 0000 0004-Mastercard", {"card": 1}),
    # ...but an id's tagged group is no part of the phone number after it.
    ("Re JIRA-1234 415-555-2671 is the on-call number", {"phone": 1}),
    ("Ticket INC-0042 (415) 555-2671", {"phone": 1}),
])
def test_a_group_glued_to_a_neighbour_leaves_the_value_beside_it(
        redactor: Redactor, text: str, found: dict) -> None:
    # The run took in the next number ("2x", "9am", a time's "00"), glued to a word or a
    # number: the whole run, value included, went out unread, past deny and policies.
    doc = {"messages": [{"role": "user", "content": text}]}
    assert redactor.redact("chat", doc, "t").counts == found


_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYQWERTYUKEY"
_AWS_SESSION = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD" + "Ab9/" * 80


@pytest.mark.parametrize("text", [
    f'{{"Credentials": {{"AccessKeyId": "ASIAIOSFODNN7QWERTYU", "SecretAccessKey": '
    f'"{_AWS_SECRET}", "SessionToken": "{_AWS_SESSION}"}}}}',
    f"aws configure set aws_secret_access_key {_AWS_SECRET}",
    f"- name: AWS_SECRET_ACCESS_KEY\n  value: {_AWS_SECRET}",
    f"secret_key: {_AWS_SECRET}",
    # Spelled in another case than the literals that let the pattern run, or in prose,
    # or beside its key id (the console's CSV): the secret half went out.
    f"SECRET_ACCESS_KEY={_AWS_SECRET}",
    f"secretAccessKey: '{_AWS_SECRET}'",
    f"sessionToken: '{_AWS_SESSION}'",
    f"Secret access key: {_AWS_SECRET}",
    f"The key is AKIAIOSFODNN7QWERTYU and the secret is {_AWS_SECRET}.",
    f"Access key ID,Secret access key\nAKIAIOSFODNN7QWERTYU,{_AWS_SECRET}\n",
])
def test_an_aws_secret_without_aws_before_it_is_found(redactor: Redactor, text: str) -> None:
    # Only "aws…secret = …" was read: STS's answer, the CLI's command and a Kubernetes
    # env entry went out with the secret key (and session token), their key id masked.
    import json

    for doc, operation in (
            ({"messages": [{"role": "user", "content": text}]}, "chat"),
            ({"input": [{"type": "function_call_output", "call_id": "c",
                         "output": {"Credentials": {"SecretAccessKey": _AWS_SECRET,
                                                    "SessionToken": _AWS_SESSION}}}]},
             "responses"),
            ({"messages": [{"role": "tool", "tool_call_id": "c", "content": json.dumps(
                {"aws_secret_access_key": _AWS_SECRET})}]}, "chat")):
        res = redactor.redact(operation, doc, "t")
        sent = json.dumps(doc if res.fields is None else {**doc, **res.fields})
        assert _AWS_SECRET not in sent and _AWS_SESSION not in sent, text


@pytest.mark.parametrize(("text", "masked"), [
    ("Paid on 15 March 2024 4111 1111 1111 1111", "Paid on 15 March 2024 [CARD_1]"),
    ("Paid 2019 4111-1111-1111-1111", "Paid 2019 [CARD_1]"),
    ("Room 33 4111 1111 1111 1111", "Room 33 [CARD_1]"),
    # Groups of four that run on are still no card.
    ("1234 5678 9012 3456 7890", "1234 5678 9012 3456 7890"),
])
def test_a_number_right_before_a_card_hides_none_of_it(redactor: Redactor, text: str,
                                                       masked: str) -> None:
    # A year before it hid the whole card; a short number made the card's first
    # groups a phone number and sent the rest as written.
    res = redactor.redact("chat", {"messages": [{"role": "user", "content": text}]}, "t")
    sent = res.fields["messages"][0]["content"] if res.fields else text
    assert sent == masked


def test_an_address_under_an_internationalized_tld_is_masked_whole(redactor: Redactor) -> None:
    # The TLD in its ASCII form (.xn--p1ai, Russia's .рф) was cut at "xn":
    # "[EMAIL_1]--p1ai" told the provider the domain's country.
    for tld in ("xn--p1ai", "XN--P1AI"):
        doc = {"messages": [{"role": "user", "content": f"write admin@example.{tld}"}]}
        assert redactor.redact("chat", doc, "t").fields["messages"][0]["content"] == \
            "write [EMAIL_1]"


@pytest.mark.parametrize("text", ["icon@2x.png", "getty@tty1.service", "icon@2x.dark.png",
                                  "logo@3X.min.svg"])
def test_a_file_name_with_an_at_sign_is_no_address(redactor: Redactor, text: str) -> None:
    doc = {"messages": [{"role": "user", "content": f"see {text}"}]}
    assert redactor.redact("chat", doc, "t").counts == {}


@pytest.mark.parametrize("text", ["Tracking number 9400 1118 9922 3333 4444 55",
                                  "Serial: 2024 0501 1234 5678"])
def test_an_identifier_word_covers_its_whole_number(redactor: Redactor, text: str) -> None:
    # Only a window starting at the number's first group was an identifier: its last
    # groups were masked as a phone number, the rest sent.
    doc = {"messages": [{"role": "user", "content": text}]}
    assert redactor.redact("chat", doc, "t").counts == {}


@pytest.mark.parametrize("text", ["Order 4471 415-555-2671", "Order #4471 (415) 555-2671",
                                  "PO 8812 415 555 2671", "Invoice 20240042 07700 900123"])
def test_a_phone_number_written_after_an_identifiers_number_is_its_own(
        redactor: Redactor, text: str) -> None:
    # The identifier names its own number: one written otherwise after it is a value.
    doc = {"messages": [{"role": "user", "content": text}]}
    assert redactor.redact("chat", doc, "t").counts == {"phone": 1}


@pytest.mark.parametrize(("text", "masked"), [
    ("call +49 30 1234 5678/office", "call [PHONE_1]/office"),
    # Tagged with a word, but after a phone word.
    ("phone: 020 7946 0958-home", "phone: [PHONE_1]-home"),
])
def test_a_phone_number_tagged_with_a_word_is_masked_whole(redactor: Redactor, text: str,
                                                           masked: str) -> None:
    res = redactor.redact("chat", {"messages": [{"role": "user", "content": text}]}, "t")
    assert res.fields["messages"][0]["content"] == masked


def test_a_phone_keys_string_is_read_as_a_phone(redactor: Redactor) -> None:
    # A string under a class key got no label (a number did): a British number without
    # its '+' went out as it came.
    doc = {"input": [{"type": "function_call_output", "call_id": "c",
                      "output": {"phone": "442079460958"}}]}
    assert redactor.redact("responses", doc, "t").counts == {"phone": 1}


def test_two_extensions_of_one_number_are_two_values(redactor: Redactor) -> None:
    # They shared one placeholder, and restore gave sales' extension for support's.
    text = "Sales: +1 415 555 0132 ext. 12. Support: +1 415 555 0132 ext. 34. Or +1 415 555 0132."
    assert _chat_text(redactor, text) == "Sales: [PHONE_1]. Support: [PHONE_2]. Or [PHONE_3]."


_B64 = "AAAAIHcR9" + "Ab1Cd2Ef3Gh4" * 5


@pytest.mark.parametrize(("text", "cls"), [
    # Private keys out of PEM, which deny refuses by default: they went out.
    (f"PuTTY-User-Key-File-3: ssh-ed25519\nPrivate-Lines: 1\n{_B64}\nPrivate-MAC: ab12",
     "private_key"),
    ("[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=", "private_key"),
    (f"private_key: MIIEpAIBAAKCAQEA{_B64}", "private_key"),
    # Azure's other secrets, a Discord webhook.
    ("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;"
     "SharedAccessKey=" + "Ab1Cd2Ef3G" * 4 + "Ab1=", "cloud_key"),
    ("https://acct.blob.core.windows.net/c/f?sv=2022-11-02&sp=r&sig=" + "Ab1Cd2Ef3G" * 4
     + "Ab1%3D", "cloud_key"),
    ("https://discord.com/api/webhooks/123456789012345678/" + "Ab1Cd2Ef3G" * 6 + "Ab1Cd",
     "api_key"),
])
def test_secrets_of_other_forms_are_found(redactor: Redactor, text: str, cls: str) -> None:
    doc = {"messages": [{"role": "user", "content": text}]}
    assert redactor.redact("chat", doc, "t").counts == {cls: 1}


def test_a_private_key_under_its_json_key_is_found(redactor: Redactor) -> None:
    doc = {"messages": [{"role": "tool", "tool_call_id": "c", "content": json.dumps(
        {"privateKey": "MIIEpAIBAAKCAQEA" + _B64})}]}
    assert redactor.redact("chat", doc, "t").counts == {"private_key": 1}


@pytest.mark.parametrize("text", ["reply to jane.doe@example.com",
                                  ["reply to jane.doe@example.com"],
                                  {"jane.doe@example.com": "low"}])
def test_a_responses_text_setting_of_any_shape_is_read(redactor: Redactor, text) -> None:
    # Only an object's values were read: a string, a list or a key went out in clear.
    doc = {"model": "m", "input": "hi", "text": text}
    res = redactor.redact("responses", doc, "t")
    assert res.counts == {"email": 1}
    assert "jane.doe@example.com" not in json.dumps(res.fields)


@pytest.mark.parametrize(("text", "want"), [
    # A password was masked only where its host had a top-level domain (read as an
    # address): a service name or localhost sent it in clear.
    ("postgres://app:Tr0ub4dor3x@db:5432/app", "postgres://app:[PASSWORD_1]@db:5432/app"),
    ("amqp://guest:guest123@rabbitmq", "amqp://guest:[PASSWORD_1]@rabbitmq"),
    ("Server=db;User Id=sa;Password=Tr0ub4dor3x;", "Server=db;User Id=sa;Password=[PASSWORD_1];"),
    ("jdbc:mysql://db/x?user=a&password=Hunter22", "jdbc:mysql://db/x?user=a&password=[PASSWORD_1]"),
    ("DB_PASSWORD=s3cr3t!", "DB_PASSWORD=[PASSWORD_1]"),
    ("Driver={SQL};Server=x;UID=a;PWD=Hunter22", "Driver={SQL};Server=x;UID=a;PWD=[PASSWORD_1]"),
    ('password = "hunter22"', 'password = "[PASSWORD_1]"'),
    # On a command line, under `_PASS`, in .netrc, in Basic credentials: they went out.
    ("mysql -u root -pS3cretPass1 -h db", "mysql -u root -p[PASSWORD_1] -h db"),
    ("sshpass -p 'S3cret!23x' ssh web", "sshpass -p '[PASSWORD_1]' ssh web"),
    ("docker login -u ci -p Dkr_Pass2024 reg.io", "docker login -u ci -p [PASSWORD_1] reg.io"),
    ("ldapsearch -D cn=admin -w AdminPass2024 -b dc=x", "ldapsearch -D cn=admin -w "
                                                        "[PASSWORD_1] -b dc=x"),
    ("redis-cli -h cache -p 6379 -a R3disPass2024 ping", "redis-cli -h cache -p 6379 -a "
                                                         "[PASSWORD_1] ping"),
    ("mysql -h db -P 3306 -u root -p'S3cretPw9'", "mysql -h db -P 3306 -u root -p'[PASSWORD_1]'"),
    ("ldapsearch -a always -x -w adm1nPw", "ldapsearch -a always -x -w [PASSWORD_1]"),
    ("gpg --batch --passphrase 'Secr3tPhrase' -d f.gpg", "gpg --batch --passphrase "
                                                         "'[PASSWORD_1]' -d f.gpg"),
    ("curl -u admin:Adm1nPass2024 https://x", "curl -u admin:[PASSWORD_1] https://x"),
    ("keytool -storepass Store2024pass -file ca.crt", "keytool -storepass [PASSWORD_1] "
                                                      "-file ca.crt"),
    ("openssl pkcs12 -passout pass:Export2024x", "openssl pkcs12 -passout pass:[PASSWORD_1]"),
    ("SMTP_USER=noreply\nSMTP_PASS=Smtp2024pass", "SMTP_USER=noreply\nSMTP_PASS=[PASSWORD_1]"),
    ("machine api.io login bot password B0tPass2024x", "machine api.io login bot password "
                                                       "[PASSWORD_1]"),
    ("nmcli dev wifi connect Corp password W1f1Pass2024", "nmcli dev wifi connect Corp "
                                                          "password [PASSWORD_1]"),
    # Review: lower-case `pass` names, SQL, .netrc over lines, a URL's `&`, glued flags.
    ("auth: { user: 'me', pass: 'abcd1234efgh' }", "auth: { user: 'me', pass: '[PASSWORD_1]' }"),
    ("ansible_become_pass: B3come1", "ansible_become_pass: [PASSWORD_1]"),
    ("export pass=letmein123", "export pass=[PASSWORD_1]"),
    ('dbPass: "Secr3t99"', 'dbPass: "[PASSWORD_1]"'),
    ("ALTER USER postgres WITH PASSWORD 'Pg4lterPw';", "ALTER USER postgres WITH PASSWORD "
                                                       "'[PASSWORD_1]';"),
    ("ALTER USER 'root'@'%' IDENTIFIED BY 'MyN3wPass';", "ALTER USER 'root'@'%' IDENTIFIED "
                                                         "BY '[PASSWORD_1]';"),
    ("machine h\n  login bob\n  password S3cretPw1", "machine h\n  login bob\n  password "
                                                      "[PASSWORD_1]"),
    ('curl "https://x/i?page=2&limit=50" -u admin:Adm1n2024', 'curl "https://x/i?page=2&limit=50" '
                                                              "-u admin:[PASSWORD_1]"),
    ("sshpass -pS3cretPw ssh u@h", "sshpass -p[PASSWORD_1] ssh u@h"),
    ("ldapsearch -x -wAdm1nPw -b dc=x", "ldapsearch -x -w[PASSWORD_1] -b dc=x"),
    ("openssl rsa -passin 'pass:Inp4ss99' -out d.pem", "openssl rsa -passin 'pass:[PASSWORD_1]' "
                                                      "-out d.pem"),
    ("Authorization: Basic " + base64.b64encode(b"admin:Adm1nPass2024").decode(),
     "Authorization: Basic [PASSWORD_1]"),
    ('{"auths": {"reg.io": {"auth": "' + base64.b64encode(b"ci:Dkr_Pass2024").decode()
     + '"}}}', '{"auths": {"reg.io": {"auth": "[PASSWORD_1]"}}}'),
    # SQL with no other word for a password in it, double-quoted, MySQL's plugin named,
    # Oracle's unquoted: they went out in clear.
    ("CREATE USER 'app'@'%' IDENTIFIED BY 'S3cretPw!';", "CREATE USER 'app'@'%' IDENTIFIED "
                                                         "BY '[PASSWORD_1]';"),
    ('CREATE USER \'app\'@\'%\' IDENTIFIED BY "S3cretPw!";', "CREATE USER 'app'@'%' "
                                                           'IDENTIFIED BY "[PASSWORD_1]";'),
    ("ALTER USER 'root'@'localhost' IDENTIFIED WITH caching_sha2_password BY 'N3wRootPw';",
     "ALTER USER 'root'@'localhost' IDENTIFIED WITH caching_sha2_password BY "
     "'[PASSWORD_1]';"),
    ("CREATE USER app IDENTIFIED BY S3cretPw1;", "CREATE USER app IDENTIFIED BY [PASSWORD_1];"),
    ("create user app\n  identified by Secr3tPw\n  default tablespace users;",
     "create user app\n  identified by [PASSWORD_1]\n  default tablespace users;"),
    # mysql after a pipe, `;` or `&&` with no space, run from a path or a variable's.
    ("echo x |mysql -uroot -pS3cret", "echo x |mysql -uroot -p[PASSWORD_1]"),
    ("cd /srv;mysql -uroot -pS3cret9", "cd /srv;mysql -uroot -p[PASSWORD_1]"),
    ("cd /srv&&mysql -uroot -pS3cret9", "cd /srv&&mysql -uroot -p[PASSWORD_1]"),
    ("./mysql -uroot -pS3cret9", "./mysql -uroot -p[PASSWORD_1]"),
    ("$BIN/mysql -uroot -pS3cret9", "$BIN/mysql -uroot -p[PASSWORD_1]"),
    ("C:\\bin\\mysql.exe -uroot -pS3cret9", "C:\\bin\\mysql.exe -uroot -p[PASSWORD_1]"),
    # A redirection's `&` is in the command.
    ("mysql -uroot -pS3cret9 2>&1 | tee log", "mysql -uroot -p[PASSWORD_1] 2>&1 | tee log"),
    # camelCase and run-together names for what logs in.
    ("dbPass=S3cret99x", "dbPass=[PASSWORD_1]"),
    ('$dbpass = "S3cret99";', '$dbpass = "[PASSWORD_1]";'),
    ('ldap_pass: "Ld4pPw99"', 'ldap_pass: "[PASSWORD_1]"'),
    ("RABBITMQ_DEFAULT_PASS=Rabb1tPw", "RABBITMQ_DEFAULT_PASS=[PASSWORD_1]"),
    ('{"oldPass": "Old2023x", "newPass": "N3w2024x"}',
     '{"oldPass": "[PASSWORD_1]", "newPass": "[PASSWORD_2]"}'),
])
def test_passwords_are_found(redactor: Redactor, text: str, want: str) -> None:
    assert _chat_text(redactor, text) == want


@pytest.mark.parametrize("text", [
    "password: required", "password=${DB_PASSWORD}", "password: {{ vault_pw }}",
    "user, password = get_auth(url)", 'print(f"password={password!r}")',
    "hostname:port:username:password:base_dn:flags", "password: ********",
    '"Password": {"type": "string"}',
    # The shell's working directory, as env and coding agents print it.
    "PWD=/home/dev/app\nOLDPWD=/home/dev", "export PATH=$PWD:/usr/local/bin",
    "PWD: /workspace/repo",
    # A word of another script, code's value, a label, a slot, a version in a URL.
    "password: Contraseña", "password: Пароль", "password: process.env.DB_PASSWORD",
    'proxy_password=self._socks_options["password"]', "password: hashedPassword",
    "password: config.db2.password", "pwd = os.getcwd()", '"password": "<password>"',
    "DB_PASSWORD=your_db_password", "password: !secret mqtt_password",
    '"confirmPassword": "パスワード\uff08確認\uff09"', "uses: docker://alpine:3.19@sha256:abcdef",
    # Other flags of those commands, prose, the docs' `user:pass`, no base64 pair.
    "docker compose -p myproject2 up -d", "docker run -p 8080:80 -w /app node:20",
    "mysql -u root -p mydb < dump.sql", "git push -u origin main",
    "curl -u $USER:$TOKEN https://x", "All tests pass: 42 of 42. PASS test_auth2",
    "bypass=abc123 compass: north2", "the password reset link expires in 24h",
    "Basic settings1 are in the config file", "Authorization: Basic dXNlcjpwYXNz",
    '{"auth": "oauth2"}',
    # Test runs, access logs, SQL, other commands' flags.
    "--- PASS: TestParseV2 (0.00s)", "PASS: tests/test-foo1",
    '"POST /api/v1/reset-password HTTP/1.1" 200 512',
    "CREATE TABLE users (password VARCHAR(255) NOT NULL);", "sudo passwd deploy01",
    "store the password SHA256-hashed", "mysql -u root -p shop2024 < dump.sql",
    "docker-compose -f docker-compose.mysql.yml -p app2 up -d",
    "cd mysql && mkdir -p backups/2024", "redis-cli -h cache1 -p 6380 -n 2 ping",
    "pytest tests/test_mongo.py -p xdist2",
    'echo "login page password field2 is required"', "Webpack: first_pass: 2.3s",
    "sudo find /etc/mysql -type f -print0",
    # Prose that says what identifies a thing; SQL*Plus's variables.
    "The suspect was identified by the team2", 'Each user is identified by "uid42" here',
    "we grant access to staff identified by badge2", "ALTER USER scott IDENTIFIED BY :pw2;",
    # A renderer's passes, words that end in "pass", nginx's upstream.
    'render_pass = "gbuffer2"', 'renderPass: "shadow_map1"', 'subPass = "lighting2"',
    'bypass = "x1"', 'compass = "north2"', 'shadow_pass = "depth2"',
    "proxy_pass http://backend1:8080;", 'nginx_proxy_pass: "http://backend1:8080"',
    # A command run in the background ends at its `&`: the next one's flags are its own.
    "mysql -h db < init.sql & mkdir -pbackup2", "mongod --fork & mkdir -p logs2024",
    "ls /etc/mysql -p2",
])
def test_what_only_names_a_password_stays(redactor: Redactor, text: str) -> None:
    assert _chat_text(redactor, text) == text


def test_a_password_under_its_json_key_is_found(redactor: Redactor) -> None:
    doc = {"messages": [{"role": "tool", "tool_call_id": "c", "content": json.dumps(
        {"db": {"dbPassword": "Tr0ub4dor3x"}, "password": "required"})}]}
    res = redactor.redact("chat", doc, "t")
    assert res.counts == {"password": 1}
    assert "Tr0ub4dor3x" not in json.dumps(res.fields)


@pytest.mark.parametrize(("text", "found"), [
    # Keys of no known prefix, known by their name only: they went out in clear.
    ("DD_API_KEY=0123456789abcdef0123456789abcdef", True),
    ("Authorization: Bearer abc123DEF456ghi789JKL012", True),
    ("client_secret: 'Xy12Zk9LmN0pQr5StUv8'", True),
    # A name, a slot or prose: no key.
    ("api_key = get_api_key_from_env()", False),
    ("API_KEY=your-api-key-here", False),
    ("a bearer token is sent with each request", False),
    ("OPENAI_API_KEY=$OPENAI_API_KEY", False),
    # Code's names, which mix in a digit too.
    ("val accessToken: OAuth2AccessToken", False),
    ("access_token = create_access_token_v2(user)", False),
    ("API_KEY=your_api_key_v2_goes_here", False),
])
def test_a_key_known_by_its_name_alone_mixes_letters_and_digits(
        redactor: Redactor, text: str, found: bool) -> None:
    doc = {"messages": [{"role": "user", "content": text}]}
    assert redactor.redact("chat", doc, "t").counts == ({"api_key": 1} if found else {})


@pytest.mark.parametrize("text", [
    "npm_config_strict_peer_dependencies_setting",
    "def whsec_verify_signature_and_parse_event_payload(): pass",
    "fw_UpdateProcedureForDevicesV2", "r8_SomeVeryLongCamelCaseFunctionNameHereX",
    "glpat-contribution-guidelines-for-maintainers",
])
def test_a_name_that_took_a_keys_prefix_is_no_key(redactor: Redactor, text: str) -> None:
    assert _chat_text(redactor, text) == text


@pytest.mark.parametrize("text", [
    # No key in them: the default deny refused each request.
    "My key file starts with -----BEGIN OPENSSH PRIVATE KEY----- but ssh says invalid",
    "Paste the key between -----BEGIN PRIVATE KEY----- and -----END PRIVATE KEY----- lines.",
    '_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"',
    "private_key: /home/runner/work/infra/terraform/environments/production/deploy.pem",
    "Private-Lines: 14\nfollowed by the MAC",
])
def test_what_only_names_a_private_key_is_none(redactor: Redactor, text: str) -> None:
    doc = {"messages": [{"role": "user", "content": text}]}
    assert redactor.redact("chat", doc, "t").counts == {}


def test_a_der_key_under_its_name_is_found_over_its_wrapped_lines(redactor: Redactor) -> None:
    lines = ["MIIEpAIBAAKCAQEA" + "Ab1Cd2Ef3Gh4" * 4, "Ab1Cd2Ef3Gh4" * 5 + "Ab1C", "Zz9="]
    text = "private_key: " + "\n".join(lines)
    redactor_mask = Redactor(RedactionSettings(actions={"private_key": "mask"}),
                             hmac_key=b"k" * 32)
    assert _chat_text(redactor_mask, text) == "private_key: [PRIVATE_KEY_1]"


def test_a_key_under_its_json_name_is_found(redactor: Redactor) -> None:
    # In a message the key was found, in a tool call's arguments it went out.
    for args in ({"api_key": "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"},
                 {"client_secret": "Xy12Zk9LmN0pQr5StUv8"}):
        doc = {"messages": [{"role": "assistant", "tool_calls": [{
            "id": "c", "type": "function",
            "function": {"name": "f", "arguments": json.dumps(args)}}]}]}
        assert redactor.redact("chat", doc, "t").counts == {"api_key": 1}


@pytest.mark.parametrize("text", [
    "Boston, MA  02110-1301  USA",  # the GPL's notice: a ZIP+4 after two spaces
    '{"version": "1.0.0.12"}', '__version__ = "3.5.0.1"',  # a version word before
    "GOCSPX-your-api-key-here-xxxxxxxxxxxx", "ya29.XXXXXXXXXXXXXXXXXXXXXXXXXX",  # slots
])
def test_addresses_versions_and_key_slots_stay(redactor: Redactor, text: str) -> None:
    assert _chat_text(redactor, text) == text


@pytest.mark.parametrize(("text", "cls"), [
    # From the review: base64 keys cut at their first "+", lower-case keys taken for
    # words, MYSQL_PWD, Pwd= past the first line, a dotted password, an Ed25519 key.
    ("AZURE_API_KEY=Xk9aBcDeFgHiJkLmNoPqRsTuVwXy+mnop/qrstUvWx==", "api_key"),
    ("MAILGUN_API_KEY=pnd1cdxxlpbfhebcbxqikl7aycpjcawh", "api_key"),
    ("MYSQL_PWD=Hunter22", "password"),
    ("Server=x\nPwd=Hunter22;", "password"),
    ("private_key: MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnFab1Cd2Ef",
     "private_key"),
])
def test_secrets_the_first_precision_pass_had_let_go_are_found(
        redactor: Redactor, text: str, cls: str) -> None:
    doc = {"messages": [{"role": "user", "content": text}]}
    res = redactor.redact("chat", doc, "t")
    assert res.counts == {cls: 1}
    assert "Hunter22" not in json.dumps(res.fields) and "mnop" not in json.dumps(res.fields)


def test_an_input_items_tools_are_read_by_extra_paths_as_tools_are() -> None:
    # Read as any value, the tool itself was renamed ("page_oncall_[PHONE:…]"), and a
    # policy stripping it found nothing to strip.
    r = Redactor(RedactionSettings(extra_paths=["input[*].tools"]))
    tool = {"type": "function", "name": "page_oncall_+14155550132",
            "description": "mail jane@example.com"}
    doc = {"model": "m", "input": [{"type": "tool_search_output", "tools": [tool]}]}
    res = r.redact("responses", doc, "t")
    (sent,) = res.fields["input"][0]["tools"]
    assert sent["name"] == tool["name"] and sent["description"].startswith("mail [EMAIL")
    # Without the path, as the top level's tools, they are not read.
    assert Redactor(RedactionSettings()).redact("responses", doc, "t").fields == {}
