"""Seeded corpora for the redaction bars: PII spans per data class, evasion variants of
them, and benign look-alikes. Generated at test time (Faker, fixed seeds): nothing stored.

Ground truth is independent of the detectors: Faker values (phone numbers kept only where
`phonenumbers.parse` + `is_valid_number` accept them for the locale's region, the library's
own end-to-end check), cards for brands Faker lacks built from public IIN ranges with a
Luhn digit, IPv6 from random 128-bit values.
"""

from __future__ import annotations

import ipaddress
import json
import random
import string
import uuid
import zlib
from dataclasses import dataclass
from functools import lru_cache

import phonenumbers
from faker import Faker

SEED = 20240601
LOCALES = {"en_US": "US", "en_GB": "GB", "de_DE": "DE", "fr_FR": "FR", "es_ES": "ES",
           "it_IT": "IT", "nl_NL": "NL", "pt_BR": "BR", "ja_JP": "JP", "en_IN": "IN",
           "en_CA": "CA", "en_AU": "AU"}
IBAN_LOCALES = ("de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "en_GB", "pt_BR", "pl_PL",
                "de_AT", "fr_CH", "nl_BE", "pt_PT", "fi_FI", "sv_SE", "da_DK", "no_NO",
                "cs_CZ", "sk_SK", "ro_RO", "hu_HU", "el_GR", "tr_TR", "uk_UA", "de_LI")
STRUCTURED = ("email", "phone", "ssn", "card", "iban", "ipv4", "ipv6")

# Brands Faker does not produce (or not all ranges of): (name, prefixes, length, grouping)
EXTRA_CARD_BRANDS = (
    ("mastercard-2series", [str(p) for p in range(2221, 2721)], 16),
    ("discover-64x", ["644", "645", "646", "647", "648", "649"], 16),
    ("discover-6221", [str(p) for p in range(622126, 622926)], 16),
    ("jcb", [str(p) for p in range(3528, 3590)], 16),
    ("unionpay", ["62"], 16),
    ("unionpay-19", ["62"], 19),
    ("mir", ["2200", "2201", "2202", "2203", "2204"], 16),
    ("rupay", ["60", "65", "81", "82", "508"], 16),
    ("verve", [str(p) for p in range(506099, 506199)], 16),
    ("troy", ["9792"], 16),
    ("dankort", ["5019"], 16),
    ("uatp", ["1"], 15),
    ("diners-36", ["36"], 14),
    ("maestro-19", ["6759", "6761", "5018"], 19),
)
FAKER_CARD_TYPES = ("amex", "diners", "discover", "jcb15", "jcb16", "mastercard", "visa16",
                    "visa13", "visa19", "maestro")

FILLER = (
    "Thanks for getting back to me so quickly.", "Let me know if anything else is needed.",
    "The meeting moved to next week.", "I have attached the notes from yesterday.",
    "Could you double-check the numbers in the report?", "We shipped 3 boxes on Monday.",
    "Der Termin ist am Dienstag.", "Merci pour votre aide.", "Gracias por todo.",
    "Il pacco arriva domani.", "Bedankt voor je bericht.", "Obrigado pela resposta.",
    "ご確認をお願いします。", "Please review section 4 before Friday.",
)
TEMPLATES = {
    "email": ("Contact me at {v}.", "Send it to <{v}> please", "(email: {v})", "{v}",
              "E-Mail: {v}, danke", "cc \"{v}\" on the thread", "mailto:{v}"),
    "phone": ("Call me on {v}.", "Tel: {v}", "my number is {v}, thanks", "({v})",
              "Reach the office at {v} after 9", "WhatsApp {v}", "{v}"),
    "ssn": ("SSN: {v}", "my social security number is {v}.", "({v})", "ID {v} on file",
            "{v}"),
    "card": ("Card number {v}, exp 12/27", "pay with {v}.", "cc: {v}", "({v})", "{v}",
             "Karte {v} bitte belasten"),
    "iban": ("IBAN: {v}", "transfer to {v}.", "Bankverbindung {v}", "({v})", "{v}"),
    "ipv4": ("from {v}.", "server at {v}:8080", "IP {v}, port 22", "[{v}]", "{v}"),
    "ipv6": ("from {v}.", "host [{v}]:443", "address {v}, link-local", "{v}"),
}


@dataclass
class Doc:
    text: str
    truth: list[tuple[str, int, int]]  # (class, start, end)


def _faker(locale: str, salt: int) -> Faker:
    f = Faker(locale)
    f.seed_instance(SEED + salt)
    return f


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)


def _group_card(digits: str, sep: str) -> str:
    n = len(digits)
    if n == 15 and digits[:2] in ("34", "37"):
        sizes = [4, 6, 5]
    elif n == 14:
        sizes = [4, 6, 4]
    else:
        sizes = [4] * (n // 4) + ([n % 4] if n % 4 else [])
    out, pos = [], 0
    for z in sizes:
        out.append(digits[pos:pos + z])
        pos += z
    return sep.join(out)


def values(cls: str, n: int, salt: int = 0) -> list[str]:
    return list(_values(cls, n, salt))


@lru_cache(maxsize=64)
def _values(cls: str, n: int, salt: int) -> tuple[str, ...]:
    rng = random.Random(SEED * 7 + salt + zlib.crc32(cls.encode()) % 1000)
    out: list[str] = []
    if cls == "email":
        fakers = [_faker(loc, salt + i) for i, loc in enumerate(LOCALES)]
        while len(out) < n:
            f = rng.choice(fakers)
            v = rng.choice((f.email, f.company_email, f.free_email, f.ascii_safe_email))()
            out.append(v.upper() if rng.random() < 0.05 else v)
    elif cls == "phone":
        fakers = [(_faker(loc, salt + i), reg) for i, (loc, reg) in enumerate(LOCALES.items())]
        fmts = (phonenumbers.PhoneNumberFormat.NATIONAL,
                phonenumbers.PhoneNumberFormat.INTERNATIONAL,
                phonenumbers.PhoneNumberFormat.E164)
        while len(out) < n:
            f, region = rng.choice(fakers)
            if rng.random() < 0.6:
                v = f.phone_number()
                try:
                    num = phonenumbers.parse(v, region)
                except phonenumbers.NumberParseException:
                    continue
                if phonenumbers.is_valid_number(num):
                    out.append(v)
            else:
                kind = rng.choice((phonenumbers.PhoneNumberType.MOBILE,
                                   phonenumbers.PhoneNumberType.FIXED_LINE))
                ex = phonenumbers.example_number_for_type(region, kind)
                if ex is None:
                    continue
                nsn = phonenumbers.national_significant_number(ex)
                nsn = nsn[:-4] + "".join(rng.choice(string.digits) for _ in range(4))
                try:
                    num = phonenumbers.parse("+" + str(ex.country_code) + nsn, None)
                except phonenumbers.NumberParseException:
                    continue
                if phonenumbers.is_valid_number(num):
                    out.append(phonenumbers.format_number(num, rng.choice(fmts)))
    elif cls == "ssn":
        f = _faker("en_US", salt)
        while len(out) < n:
            v = f.ssn()
            out.append(v.replace("-", " ") if rng.random() < 0.1 else v)
    elif cls == "card":
        fakers = [_faker(loc, salt + i) for i, loc in enumerate(("en_US", "en_GB", "de_DE"))]
        while len(out) < n:
            if rng.random() < 0.55:
                f = rng.choice(fakers)
                digits = f.credit_card_number(rng.choice(FAKER_CARD_TYPES))
                if digits.startswith("0"):
                    continue  # Faker's "0604" Maestro prefix: no such IIN (MII 0 is reserved)
            else:
                _, prefixes, length = rng.choice(EXTRA_CARD_BRANDS)
                digits = _luhn_complete(rng.choice(prefixes), length, rng)
            style = rng.random()
            if style < 0.4:
                out.append(digits)
            elif style < 0.8:
                out.append(_group_card(digits, " "))
            else:
                out.append(_group_card(digits, "-"))
    elif cls == "iban":
        fakers = [_faker(loc, salt + i) for i, loc in enumerate(IBAN_LOCALES)]
        while len(out) < n:
            v = rng.choice(fakers).iban()
            if rng.random() < 0.5:
                v = " ".join(v[i:i + 4] for i in range(0, len(v), 4))
            out.append(v)
    elif cls == "ipv4":
        f = _faker("en_US", salt)
        while len(out) < n:
            out.append(rng.choice((f.ipv4, f.ipv4_private, f.ipv4_public))())
    elif cls == "ipv6":
        while len(out) < n:
            raw = bytearray(rng.getrandbits(8) for _ in range(16))
            if rng.random() < 0.5:  # zero runs, so '::' compression shows up
                z = rng.randrange(0, 12)
                raw[z:z + rng.randrange(2, 6)] = bytes(rng.randrange(2, 6))
                raw = raw[:16].ljust(16, b"\x00")
            if rng.random() < 0.2:
                raw[:2] = b"\xfe\x80"
                raw[2:8] = bytes(6)
            addr = ipaddress.IPv6Address(bytes(raw))
            v = addr.compressed if rng.random() < 0.8 else addr.exploded
            out.append(v.upper() if rng.random() < 0.1 else v)
    else:
        raise ValueError(cls)
    return tuple(out[:n])


def documents(cls: str, vals: list[str], per_doc: int = 25, seed: int = 0) -> list[Doc]:
    rng = random.Random(SEED + seed + len(vals))
    docs: list[Doc] = []
    for i in range(0, len(vals), per_doc):
        parts: list[str] = []
        truth: list[tuple[str, int, int]] = []
        pos = 0
        for v in vals[i:i + per_doc]:
            filler = rng.choice(FILLER) + " "
            tpl = rng.choice(TEMPLATES[cls])
            before, after = tpl.split("{v}")
            chunk = filler + before
            parts.append(chunk)
            pos += len(chunk)
            parts.append(v)
            truth.append((cls, pos, pos + len(v)))
            pos += len(v)
            tail = after + " "
            parts.append(tail)
            pos += len(tail)
        docs.append(Doc("".join(parts), truth))
    return docs


# -- evasion ----------------------------------------------------------------------------

ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad")
FULLWIDTH = {c: chr(ord(c) + 0xFEE0) for c in string.digits + string.ascii_letters + "@.-+()"}


def zero_width(v: str, rng: random.Random) -> str:
    chars = list(v)
    for _ in range(rng.randint(1, 3)):
        chars.insert(rng.randint(1, len(chars) - 1), rng.choice(ZERO_WIDTH))
    return "".join(chars)


def fullwidth(v: str, rng: random.Random) -> str:
    return "".join(FULLWIDTH.get(c, c) for c in v)


def separators(cls: str, v: str, rng: random.Random) -> str:
    if cls == "email":
        return v.replace("@", "\\u0040") if rng.random() < 0.5 else v.replace("@", "&#64;")
    if cls in ("ipv4", "ipv6"):
        return v  # their separators are the format itself
    sep = rng.choice(("\u00a0", "\u202f", ".", "/", "\u2007"))
    if cls == "card":
        return _group_card("".join(c for c in v if c.isdigit()), sep)
    if cls == "iban":
        raw = v.replace(" ", "")
        return rng.choice(("\u00a0", "\u202f")).join(raw[i:i + 4] for i in range(0, len(raw), 4))
    if cls == "ssn":
        d = "".join(c for c in v if c.isdigit())
        return f"{d[:3]}{sep}{d[3:5]}{sep}{d[5:]}"
    if cls == "phone":
        return v.replace(" ", "\u00a0").replace("-", rng.choice(("\u00a0", ".", "\u2011")))
    return v


def unicode_escape(v: str, rng: random.Random) -> str:
    """Literal \\uXXXX escapes for some characters (as in a doubly encoded JSON string)."""
    out = []
    for c in v:
        if c in "@.-" or (c.isdigit() and rng.random() < 0.3):
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


EVASIONS = {"zero_width": zero_width, "fullwidth": fullwidth,
            "separators": None, "unicode_escape": unicode_escape}


def evaded(cls: str, vals: list[str], kind: str, seed: int = 0) -> list[str]:
    rng = random.Random(SEED + seed + zlib.crc32(kind.encode()) % 997)
    if kind == "separators":
        return [separators(cls, v, rng) for v in vals]
    return [EVASIONS[kind](v, rng) for v in vals]


def tool_call_body(vals: list[str], rng: random.Random) -> dict:
    """A chat body whose tool-call arguments carry the values, JSON-escaped every which way."""
    calls = []
    for k, v in enumerate(vals):
        args = {"recipient": v, "note": f"re {k}", "nested": {"raw": json.dumps({"v": v})}}
        text = json.dumps(args, ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.5:  # escape '@' and some digits as \\u00XX inside the JSON text
            text = text.replace("@", "\\u0040")
        calls.append({"id": f"call_{k}", "type": "function",
                      "function": {"name": "send", "arguments": text}})
    return {"model": "m", "messages": [{"role": "user", "content": "go"},
                                       {"role": "assistant", "content": None,
                                        "tool_calls": calls}]}


def split_parts_body(vals: list[str], rng: random.Random) -> dict:
    """Each value split across two consecutive text parts of one message."""
    messages = []
    for v in vals:
        cut = rng.randint(1, len(v) - 1)
        messages.append({"role": "user", "content": [
            {"type": "text", "text": "here it is: " + v[:cut]},
            {"type": "text", "text": v[cut:] + " thanks"}]})
    return {"model": "m", "messages": messages}


# -- benign -----------------------------------------------------------------------------

CODE = (
    "for (int i = 0; i < 1024; i++) { buf[i] = 0x7f; }",
    "std::vector<int> v; v.reserve(65536); auto it = v.begin();",
    "Foo::Bar::baz(); DB::Add(); a::b::c",
    "SELECT id, total FROM orders WHERE created_at > '2024-03-01' LIMIT 500;",
    "x = np.arange(0, 100, 0.5); y = x[10:20]",
    "@app.route('/api/v1/items/<int:item_id>')",
    "git checkout -b fix/1234-retry && git commit -m 'bump 2.3.1'",
    "docker run -p 8080:80 -e TZ=UTC nginx:1.25.3",
    "kubectl scale deploy/api --replicas=12",
    "const timeout = 30_000; // ms",
    "if (err != nil) { return fmt.Errorf(\"code %d\", 404) }",
    "matrix = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]",
    "ls -la /var/log/nginx/ | grep 2024-06",
    "npm install @types/node@20.11.5 --save-dev",
    "pip install 'requests>=2.31.0,<3'",
    "time.sleep(0.25)  # 250 ms backoff",
    "print(f'{value:08.3f}')",
    "chmod 0755 ./run.sh",
    "curl -s localhost:9090/metrics | grep http_requests_total",
    "export PATH=/usr/local/bin:$PATH",
    "user@host:~$ make -j8",
    "%timeit sum(range(10**6))",
    "{\"id\": 42, \"qty\": 3, \"price\": 19.99}",
    "assert len(buf) == 4096",
    "a = b'\\x00\\x01\\x02'",
)


def benign_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, text) items that contain no personal data or secrets."""
    rng = random.Random(SEED + 99 + seed)
    f = _faker("en_US", 7 + seed)
    out: list[tuple[str, str]] = []
    hexd = "0123456789abcdef"

    def digits(k: int) -> str:
        return "".join(rng.choice(string.digits) for _ in range(k))

    makers = {
        "uuid": lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "uuid_upper": lambda: str(uuid.UUID(int=rng.getrandbits(128))).upper(),
        "timestamp_iso": lambda: f.date_time_this_decade().isoformat() + rng.choice(
            ("", "Z", "+02:00", ".123Z")),
        "timestamp_space": lambda: f.date_time_this_decade().strftime("%Y-%m-%d %H:%M:%S"),
        "date_eu": lambda: f.date_this_decade().strftime(rng.choice(
            ("%d.%m.%Y", "%d/%m/%Y", "%m/%d/%Y", "%Y/%m/%d", "%d-%m-%Y"))),
        "date_time_eu": lambda: f.date_time_this_decade().strftime("%d.%m.%Y %H:%M"),
        "unix_s": lambda: str(rng.randint(1_500_000_000, 1_800_000_000)),
        "unix_ms": lambda: str(rng.randint(1_500_000_000_000, 1_800_000_000_000)),
        "rfc2822": lambda: f.date_time_this_decade().strftime("%a, %d %b %Y %H:%M:%S +0000"),
        "order": lambda: rng.choice((
            f"Order #{digits(rng.randint(5, 10))}",
            f"ORD-{digits(4)}-{digits(6)}",
            f"order {digits(3)}-{digits(7)}-{digits(7)}",
            f"Order No. {digits(8)}",
            f"PO-{digits(6)}",
            f"order id {digits(rng.randint(9, 12))}",
            f"tracking number {digits(12)}",
        )),
        "invoice": lambda: rng.choice((
            f"INV-{rng.randint(2015, 2030)}-{digits(6)}",
            f"Invoice {digits(rng.randint(6, 10))}",
            f"invoice no. {digits(4)}/{digits(4)}",
            f"Rechnung Nr. {digits(7)}",
            f"Facture n° F{digits(8)}",
            f"Invoice #{rng.randint(2015, 2030)}{digits(5)}",
        )),
        "version": lambda: rng.choice((
            f"v{rng.randint(0, 20)}.{rng.randint(0, 40)}.{rng.randint(0, 99)}",
            f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 30)}",
            f"version {rng.randint(1, 12)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}."
            f"{rng.randint(0, 99)}",
            f"build {rng.randint(10, 12)}.0.{rng.randint(10000, 30000)}.{rng.randint(0, 5000)}",
            f"{rng.randint(1, 5)}.{rng.randint(0, 20)}.{rng.randint(0, 20)}-rc.{rng.randint(1, 5)}",
            f"Python 3.{rng.randint(8, 13)}.{rng.randint(0, 12)}",
        )),
        "hex": lambda: "".join(rng.choice(hexd) for _ in range(rng.choice((7, 12, 32, 40, 64)))),
        "sha_prefixed": lambda: rng.choice(("sha256:", "md5 ", "commit ")) + "".join(
            rng.choice(hexd) for _ in range(rng.choice((40, 64, 32)))),
        "code": lambda: rng.choice(CODE),
        "price": lambda: rng.choice((
            f"${rng.randint(1, 99999):,}.{rng.randint(0, 99):02d}",
            f"{rng.randint(1, 99999):,}.{rng.randint(0, 99):02d} €".replace(",", " "),
            f"€{rng.randint(1, 9999)},{rng.randint(0, 99):02d}",
            f"¥{rng.randint(100, 999999):,}",
            f"USD {rng.randint(1, 10**7):,}",
            f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d} EUR",
            f"£{rng.randint(1, 9999)}.{rng.randint(0, 99):02d}",
        )),
        "quantity": lambda: rng.choice((
            f"{rng.randint(1, 10**6):,} requests/s",
            f"{rng.randint(1, 100)}% of {rng.randint(100, 100000)} users",
            f"{rng.randint(1, 2000)}x{rng.randint(1, 2000)} px",
            f"{rng.uniform(-90, 90):.6f}, {rng.uniform(-180, 180):.6f}",
            f"{rng.randint(1, 64)} GiB RAM, {rng.randint(1, 128)} cores",
            f"page {rng.randint(1, 999)} of {rng.randint(1000, 2000)}",
        )),
        "time": lambda: (f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                         f"{rng.randint(0, 59):02d}"),
        "mac": lambda: ":".join(f"{rng.randrange(256):02x}" for _ in range(6)),
    }
    kinds = list(makers)
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        out.append((kind, makers[kind]()))
    return out


def benign_documents(items: list[tuple[str, str]], per_doc: int = 25) -> list[str]:
    rng = random.Random(SEED + 5)
    docs = []
    for i in range(0, len(items), per_doc):
        docs.append(" ".join(rng.choice(FILLER) + " " + text for _, text in items[i:i + per_doc]))
    return docs


# -- the bars -------------------------------------------------------------------------------
#
# Spans per class: 10k for each structured class, 2k per class and evasion kind, 10k+ benign
# items. Run `python -m tests.test_redact_corpus` for the full table of figures.

import pytest  # noqa: E402

from atp_extproc.redact import RedactionSettings, Redactor  # noqa: E402

N_SPANS = 10_000
N_EVASION = 2_000
N_BENIGN = 12_000
_LABELS = {"email": "EMAIL", "phone": "PHONE", "ssn": "SSN", "card": "CARD", "iban": "IBAN",
           "ipv4": "IPV4", "ipv6": "IPV6"}


@lru_cache(maxsize=1)
def _redactor() -> Redactor:
    return Redactor(RedactionSettings())


def covered(spans, cls: str, s: int, e: int) -> bool:
    """A finding of the class covers the true span, overreaching by at most 2 characters."""
    return any(sp.cls == cls and sp.start <= s and sp.end >= e and sp.start >= s - 2
               and sp.end <= e + 2 for sp in spans)


def recall_on(cls: str, vals: list[str]) -> tuple[float, list[str]]:
    r = _redactor()
    missed: list[str] = []
    total = 0
    for doc in documents(cls, vals):
        spans = r.scan_text(doc.text)
        for c, s, e in doc.truth:
            total += 1
            if not covered(spans, c, s, e):
                missed.append(doc.text[s:e])
    return 1 - len(missed) / total, missed


def tool_call_recall(cls: str, vals: list[str]) -> float:
    rng = random.Random(SEED + 11)
    r = _redactor()
    ok = 0
    for i in range(0, len(vals), 50):
        batch = vals[i:i + 50]
        body = tool_call_body(batch, rng)
        res = r.redact("chat", body, "t")
        calls = res.fields.get("messages", body["messages"])[1]["tool_calls"]
        for call in calls:
            args = json.loads(call["function"]["arguments"])
            inner = json.loads(args["nested"]["raw"])["v"]
            label = f"[{_LABELS[cls]}_"
            ok += args["recipient"].startswith(label) and inner.startswith(label)
    return ok / len(vals)


def split_parts_recall(cls: str, vals: list[str]) -> float:
    rng = random.Random(SEED + 12)
    r = _redactor()
    ok = 0
    for i in range(0, len(vals), 50):
        batch = vals[i:i + 50]
        body = split_parts_body(batch, rng)
        res = r.redact("chat", body, "t")
        messages = res.fields.get("messages", body["messages"])
        for v, m in zip(batch, messages, strict=True):
            text = "".join(p["text"] for p in m["content"])
            ok += f"[{_LABELS[cls]}_" in text and v not in text
    return ok / len(vals)


def benign_false_positives(n: int = N_BENIGN) -> tuple[float, list[tuple[str, str, str]]]:
    r = _redactor()
    flagged = []
    items = benign_items(n)
    for kind, text in items:
        for sp in r.scan_text(text):
            flagged.append((kind, text, sp.cls))
            break
    return len(flagged) / len(items), flagged


def mixed_precision() -> dict[str, float]:
    """Per class TP / (TP + FP) on documents mixing every class with benign items."""
    rng = random.Random(SEED + 13)
    r = _redactor()
    pii = [(c, v) for c in STRUCTURED for v in values(c, 2_000, salt=3)]
    benign = [("benign", t) for _, t in benign_items(len(pii), seed=3)]
    items = pii + benign
    rng.shuffle(items)
    tp = dict.fromkeys(STRUCTURED, 0)
    fp = dict.fromkeys(STRUCTURED, 0)
    for i in range(0, len(items), 30):
        parts, truth, pos = [], [], 0
        for cls, v in items[i:i + 30]:
            filler = rng.choice(FILLER) + " "
            parts.append(filler)
            pos += len(filler)
            if cls != "benign":
                truth.append((cls, pos, pos + len(v)))
            parts.append(v + " ")
            pos += len(v) + 1
        text = "".join(parts)
        for sp in r.scan_text(text):
            if sp.cls not in tp:
                continue
            if any(c == sp.cls and sp.start < e and sp.end > s for c, s, e in truth):
                tp[sp.cls] += 1
            else:
                fp[sp.cls] += 1
    return {c: tp[c] / max(1, tp[c] + fp[c]) for c in STRUCTURED}


@pytest.mark.parametrize("cls", STRUCTURED)
def test_recall_structured(cls):
    vals = values(cls, N_SPANS)
    assert len(vals) >= N_SPANS
    recall, missed = recall_on(cls, vals)
    assert recall >= 0.99, (recall, missed[:10])


@pytest.mark.parametrize("cls", STRUCTURED)
@pytest.mark.parametrize("kind", list(EVASIONS))
def test_recall_evasions(cls, kind):
    vals = evaded(cls, values(cls, N_EVASION, salt=1), kind)
    recall, missed = recall_on(cls, vals)
    assert recall >= 0.95, (recall, missed[:10])


@pytest.mark.parametrize("cls", STRUCTURED)
def test_recall_inside_tool_call_arguments(cls):
    assert tool_call_recall(cls, values(cls, N_EVASION, salt=2)) >= 0.95


@pytest.mark.parametrize("cls", STRUCTURED)
def test_recall_split_across_content_parts(cls):
    assert split_parts_recall(cls, values(cls, N_EVASION, salt=2)) >= 0.95


def test_benign_corpus_false_positive_rate():
    rate, flagged = benign_false_positives()
    assert rate <= 0.01, flagged[:20]


def test_precision_per_class_on_mixed_corpus():
    precision = mixed_precision()
    assert all(p >= 0.99 for p in precision.values()), precision


def main() -> None:  # pragma: no cover - a report for humans
    print(f"{'class':8s} {'recall':>8s} " + " ".join(f"{k:>14s}" for k in EVASIONS)
          + f" {'tool_args':>10s} {'split':>8s}")
    for cls in STRUCTURED:
        rec, _ = recall_on(cls, values(cls, N_SPANS))
        ev = [recall_on(cls, evaded(cls, values(cls, N_EVASION, salt=1), k))[0]
              for k in EVASIONS]
        tool = tool_call_recall(cls, values(cls, N_EVASION, salt=2))
        split = split_parts_recall(cls, values(cls, N_EVASION, salt=2))
        print(f"{cls:8s} {rec:8.4f} " + " ".join(f"{x:14.4f}" for x in ev)
              + f" {tool:10.4f} {split:8.4f}")
    rate, flagged = benign_false_positives()
    print(f"benign items flagged: {rate:.4%} ({len(flagged)} of {N_BENIGN})")
    for kind, text, cls in flagged[:10]:
        print(f"   {kind}: {text!r} → {cls}")
    print("precision on mixed corpus:", {c: round(p, 4) for c, p in mixed_precision().items()})


if __name__ == "__main__":  # pragma: no cover
    main()
