"""Detectors: RE2 candidate patterns (linear time, no backtracking) and their validators.

All built-in patterns run on an ASCII byte copy of the normalised text, where every
remaining non-ASCII character is one `?` byte, so byte offsets are character offsets of the
normalised text. Custom detectors run on the normalised text itself (UTF-8), so they may
use any Unicode. A single RE2 Set pass says which families can match at all; the common
"no personal data" case ends there.

Every Python-side loop is bounded per candidate (a window of at most a few groups or a
fixed number of characters), so the total work grows linearly with the text, and all of it
is charged to a per-request work budget (`Budget`): pathological input stops the scan early
and is reported incomplete instead of holding the event loop.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import pairwise

import phonenumbers
import re2
from phonenumbers import PhoneMetadata, PhoneNumber

from atp_extproc.llm_api import SURROGATE
from atp_extproc.redact.normalize import Normalized, latin_letters
from atp_extproc.redact.re2util import re2_options, search, spans
from atp_extproc.redact.settings import RedactionSettings, compile_custom

# What a placeholder looks like (`[EMAIL_1]`, `[EMAIL:3f9a…]`): scanned for here so a
# new one never collides with one already in the body, and put back by restore.py.
PLACEHOLDER = r"\[[A-Z][A-Z0-9_]*(?:_[0-9]+|:[0-9a-f]{16})\]"
# When two findings overlap, the earlier class in this list wins.
# A password before e-mail: "postgres://app:s3cret@db.example.com" read as an address.
_PRIORITY = ("private_key", "*custom*", "jwt", "cloud_key", "api_key", "github_token",
             "slack_token", "password", "email", "iban", "card", "ssn", "ipv6", "ipv4", "phone")


@dataclass(slots=True)
class Found:
    cls: str
    start: int  # normalised offsets
    end: int
    value: str  # canonical form: same value → same placeholder


@dataclass(slots=True)
class ScanResult:
    found: list[Found] = field(default_factory=list)
    data_uris: int = 0
    reserved: set[str] = field(default_factory=set)
    incomplete: bool = False


_DENSE_CHARS = 512 << 10


class Budget:
    """Work units one request may use, so no input can make a scan arbitrarily slow.

    Prose uses a few thousand units per MiB, but text dense with numbers far more: an
    application log with an id and a time on every line about 0.27 units per character,
    a CSV of contacts with phone numbers 0.32 (so such text passes up to about 600 KB).
    Adversarial input (megabytes of digit groups, invisible characters or near-miss
    candidates) uses 1 and more; it exhausts the budget, and the scan stops with
    `exhausted` set: the caller reports it incomplete and, by default, refuses. One unit
    is two to four microseconds of work: a candidate match (an IBAN or a secret two or
    three), a separator in a digit run, a run of characters to normalise, two characters
    normalised one by one; a phone validation is four.
    """

    __slots__ = ("exhausted", "left", "memo")

    def __init__(self, left: int):
        self.left = left
        self.exhausted = False
        # Phone verdicts for this request only: digits never outlive the exchange.
        self.memo: dict[tuple[str, bool, tuple[int, ...]], str | None] = {}

    @classmethod
    def for_text(cls, n_chars: int) -> Budget:
        # 0.35 a character up to 512 Ki characters (dense logs and contact lists pass;
        # text normalised character by character, 0.5, does not), 1/16 past that: three
        # 4 MiB bodies of digit soup then stop within about 2 s each, and Envoy's
        # message_timeout holds for requests queued behind them.
        dense = min(n_chars, _DENSE_CHARS)
        return cls(50_000 + dense * 7 // 20 + (n_chars - dense) // 16)

    def spend(self, units: int = 1) -> bool:
        if self.left < units:
            self.left = 0
            self.exhausted = True
            return False
        self.left -= units
        return True


def _rx(pattern: str):
    options = re2_options()
    # Without capture groups RE2 finds both ends of a match with its DFAs alone; groups
    # would make it walk long matches with the slower NFA.
    options.never_capture = "(?P<" not in pattern
    return re2.compile(pattern, options)


_ALNUM = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_DIGITS = frozenset(b"0123456789")
_AWS_PREFIXES = ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AIPA", "ANPA", "ANVA",
                 "AROA", "APKA", "ASCA")
# Per secret class, literals one of its patterns must contain: a class none of whose
# literals occurs in the text is skipped without running its patterns.
_SECRET_LITERALS: dict[str, tuple[str, ...]] = {
    "cloud_key": (*_AWS_PREFIXES, "AIza", "AccountKey=", "GOCSPX-", "ya29.",
                  "SharedAccessKey=", "sig=", "Q~"),
    "api_key": ("sk-", "rk-", "sk_live_", "sk_test_", "rk_live_", "rk_test_", "hf_",
                "glpat-", "glrt-", "gldt-", "glptt-", "gloas-", "glsoat-", "glft-", "glcbt-",
                "gsk_", "xai-", "pplx-", "r8_", "pcsk_", "lsv2_", "fw_", "whsec_", "SG.",
                "npm_", "shpat_", "shpss_", "shpca_", "shppa_", "_v1_", ":AA",
                "/api/webhooks/", "pypi-", "dapi", "ATATT", "secret_", "ntn_", "lin_api_"),
    "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    "slack_token": ("xox", "xapp-", "hooks.slack.com"),
    "jwt": ("eyJ",),
    "private_key": ("---BEGIN", "---begin", "---Begin", "---END", "---end", "---End",
                    "Private-Lines:", "PrivateKey", "AGE-SECRET-KEY-"),
    "password": ("://",),
}
# The names a key of no known prefix goes by (_NAMED_ONLY), and a password's.
_KEY_NAMES = r"api[_\-]?key|api[_\-]?token|access[_\-]?token|auth[_\-]?token|client[_\-]?secret"
_PASSWORD_NAMES = r"password|passwd|passphrase|storepass|keypass"
# `pass` alone as a name before a quoted value (nodemailer's `pass: '…'`) or `=`: a test
# run's `PASS: Test…` names none. As a name's last word only after a word for what logs
# in (`db_pass`, `$dbpass`, `smtpPass`, Ansible's `ansible_become_pass`): renderers name
# their passes so (`render_pass`, `renderPass`, `subPass`, `shadow_pass`), and English
# ends words in it (`bypass`, `compass`). An upper-case `_PASS` is an env file's, and
# there names a credential whatever comes before it (`RABBITMQ_DEFAULT_PASS=`). (No
# `proxy`: nginx's `proxy_pass` holds a URL.)
_PASS_OWNERS = (r"db|database|user|usr|admin|root|super|superuser|sys|system|master|default"
                r"|smtp|imap|pop3|mail|email|ftp|sftp|ssh|sudo|become|ldap|bind|api|auth"
                r"|login|account|acct|app|client|server|service|svc|web|http|basic|vault"
                r"|wifi|wlan|vpn|mqtt|router|device|mysql|mariadb|sql|mssql|postgres|pg"
                r"|psql|redis|mongo|mongodb|rabbitmq|rabbit|amqp|mq|kafka|sasl|jdbc|oracle"
                r"|key|store|keystore|truststore|cert|registry|docker|nexus|jenkins|git"
                r"|deploy|backup|smb|cifs|vnc|rdp|wallet|bank"
                # A form's fields: `{"oldPass": …, "newPass": …, "confirmPass": …}`.
                r"|new|old|current|curr|confirm|verify|repeat|retype|temp|tmp|initial|my")
_PASS_NAME = (rf"(?i:{_PASS_OWNERS})[0-9]?[_\-]?(?-i:pass|PASS|Pass)\b"
              r"|(?-i:[A-Z0-9]_PASS)\b")
_PASS_QUOTED = rf"{_PASSWORD_NAMES}|\bpass\b|{_PASS_NAME}"
_PASS_BARE = rf"(?:{_PASSWORD_NAMES}|{_PASS_NAME})(?:=|:[ \t]*)|\bpass="
# MySQL may name the plugin that hashes the password in between
# (`IDENTIFIED WITH caching_sha2_password BY '…'`).
_IDENTIFIED_WITH = r"(?:\s+with\s+[\"'`]?[a-z0-9_]{1,64}[\"'`]?)?"
_IDENTIFIED_BY = rf"identified{_IDENTIFIED_WITH}\s+by"
_USER_STATEMENT = (r"\b(?:create|alter)\s+user(?:\s+if\s+not\s+exists)?\s+[^\s;\x00]{1,128}"
                   r"\s+identified")
# Commands that take a password by a short flag of their own, and the spans of a command
# line up to it (no shell separator between: `cd mysql && mkdir -p x` is two commands).
_PASSWORD_COMMANDS = (r"(?:docker|podman|nerdctl|buildah) login|sshpass|mysql[a-z]*|mariadb"
                      r"|mongo[a-z]*|ldap[a-z]+|redis-cli|curl")
# A URL's `&` and a redirection's (`2>&1`, `&>log`) are in the command; `&&`, and `&`
# before a space (the next command runs as this one goes on in the background), end it.
_SAME_COMMAND = r"(?:[^\n\x00|;&]|&[^&|;\s\x00]){0,200}?[ \t]"
# Words that may come in any case (its patterns read them so): `secretAccessKey`,
# `SECRET_ACCESS_KEY`, `sessionToken`.
_SECRET_WORDS = {"cloud_key": r"(?i:aws|secret|session_?token)",
                 "api_key": rf"(?i:{_KEY_NAMES}|bearer)",
                 "private_key": r"(?i:private[_ \-]?key)",
                 "password": rf"(?i:pass|pwd|basic[ \t]|\"auth\"|netrc|wifi|"
                             rf"identified\s+(?:by|with)\s|{_PASSWORD_COMMANDS})"}
_SECRET_SET_NAMES = {cls: f"secret:{cls}" for cls in _SECRET_LITERALS}
# Between a key's name and its value: `=` or `:` (YAML, JSON), spaces (a command line), or
# a line break and `value:` (a Kubernetes env entry), then an optional quote.
_KEY_VALUE_SEP = r"(?:\s*[=:]\s*|[ \t]+|\s*\n\s*-?\s*value:\s*)[\"']?"
# A card's groups joined by a tab, a line break, a comma or an underscore (cells of a
# spreadsheet row, lines of a form, a numeric literal). Digit runs do not join on those:
# they join a list of numbers far more often than a number's groups. So only a card's own
# grouping, 4-4-4-4 or 4-6-5, with one separator throughout.
_CARD_SEP = "|".join(rf"[0-9]{{4}}(?:(?:{sep}[0-9]{{4}}){{3}}|{sep}[0-9]{{6}}{sep}[0-9]{{5}})"
                     for sep in (r"\t", r"\r\n", r"\n", ",", "_"))

# -- RE2 patterns (on ASCII bytes) ----------------------------------------------------------

_SET_PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9_%+\-?]@[A-Za-z0-9?][A-Za-z0-9\-?]*\.[A-Za-z?]",
    "digits": r"[0-9](?:[ \-./()]{0,3}[0-9]){6}",
    "card_sep": _CARD_SEP,
    "ipv4": r"[0-9]\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]",
    "ipv6": r"(?i)[0-9a-f]{1,4}:[0-9a-f]{0,4}:|::[0-9a-f]",
    "iban": r"(?i)\b[a-z]{2}[0-9]{2}[ \-]?[a-z0-9]{4}",
    # One entry per class, so the Set pass alone tells which classes can match: ordinary
    # words hit the literals often ("laws", "task-") and re-checking each literal would
    # cost a search of the whole text apiece.
    **{_SECRET_SET_NAMES[cls]: "|".join([*map(re.escape, lits), *(
        [_SECRET_WORDS[cls]] if cls in _SECRET_WORDS else [])])
       for cls, lits in _SECRET_LITERALS.items()},
    "placeholder": PLACEHOLDER,
    "data_uri": r"data:[A-Za-z]+/[A-Za-z0-9.+\-]+;base64,",
}
# The local part may hold RFC 5322's other characters (o'brien, a!b) between ordinary
# ones: at its edges they are more often quotes around the address. Not / = & | { }:
# in paths, query strings, tables and templates they join a word to the address.
_EMAIL = _rx(r"[A-Za-z0-9_._%+\-?]+(?:[!#$'*^`~]+[A-Za-z0-9_._%+\-?]+)*"
             r"@[A-Za-z0-9?][A-Za-z0-9\-?]*(?:\.[A-Za-z0-9?]"
             r"[A-Za-z0-9\-?]*)*\.(?:(?i:xn)--[A-Za-z0-9\-]{1,59}|[A-Za-z?]{2,63})")
# Seven digits at least: shorter runs are no card, SSN or phone number.
_RUN = _rx(r"\+?\(?[0-9](?:[ \-./()]{0,3}[0-9]){6,}"
           r"(?:[ ]?(?:[xX]|[eE][xX][tT]\.?)[ ]?[0-9]{1,6})?")
_EXT_TAIL = re.compile(rb"[ ]?(?:[xX]|[eE][xX][tT]\.?)[ ]?[0-9]{1,6}\Z")
# An octet with leading zeros is padded to three digits ("192.168.001.010"); "01.02.03.04"
# is a date or a version more often than an address. The padded form comes before the
# short ones, or "010" would end the match at its "0".
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|0[0-9][0-9]|[1-9]?[0-9])"
# No \b at either end: a part boundary between text parts is a word boundary the regex
# cannot see, so the neighbours are checked in Python.
_IPV4 = _rx(rf"(?:{_OCTET}\.){{3}}{_OCTET}")
_IPV6 = _rx(r"(?i)[0-9a-f.]*:[0-9a-f.]*:[0-9a-f:.]*")
_IBAN = _rx(r"(?i)\b[a-z]{2}[0-9]{2}(?:[ \-]?[a-z0-9]){11,30}")
_DATA_URI = _rx(r"data:[A-Za-z]+/[A-Za-z0-9.+\-]+;base64,[A-Za-z0-9+/=]*")
# Shorter base64 after a data: prefix is read as text: keys and card numbers are shorter.
_DATA_PAYLOAD_MIN = 100
_PLACEHOLDER = _rx(PLACEHOLDER)
# The same, for str (restore, and the placeholders a body already holds).
PLACEHOLDER_TEXT = re.compile(PLACEHOLDER)
_CARD_SEP_RX = _rx(_CARD_SEP)
# A key of no known prefix, under a name that says what it is (DD_API_KEY=…,
# `client_secret: …`, `Authorization: Bearer …`): found only where it mixes letters and
# digits, so not `api_key = get_api_key()` nor `your-api-key-here`.
_NAMED_ONLY = (
    _rx(rf"(?i)(?:{_KEY_NAMES})[\"']?" + _KEY_VALUE_SEP + r"(?P<v>[A-Za-z0-9_\-+/]{16,}={0,2})"),
    _rx(r"(?i)bearer[ \t]+(?P<v>[A-Za-z0-9_\-.~+/]{20,}=*)"),
)
# SQL's password in double quotes, and Oracle's unquoted `IDENTIFIED BY …`, only in SQL's
# capitals or where a user is made or changed: prose quotes what identifies a thing
# ('identified by "uid42"', "identified by the team2"), and "grant access to staff
# identified by badge2" makes no user. (`:pw` and `&pw` are SQL*Plus's variables.)
# Searched only in text that holds the word: most text that wakes the password class
# (any "pass", a mysql) holds no SQL, and each pattern is one more pass over it.
_IDENTIFIED_ONLY = (
    _rx(rf"(?i)(?:\b(?-i:IDENTIFIED)|{_USER_STATEMENT})"
        rf"{_IDENTIFIED_WITH}\s+by[ \t]+\"(?P<v>[^\"\s\x00]{{1,128}})\""),
    _rx(rf"(?i){_USER_STATEMENT}\s+by\s+(?P<v>[^\s\"';&:\x00][^\s\"';\x00]{{0,127}})"),
)
# HTTP Basic credentials, base64 of `user:password`: in an Authorization header, and a
# Docker config's `auth`.
_BASIC_AUTH = (
    _rx(r"(?i)\bbasic[ \t]+(?P<v>[A-Za-z0-9+/]{8,}={0,2})"),
    _rx(r"\"auth\"\s*:\s*\"(?P<v>[A-Za-z0-9+/]{8,}={0,2})\""),
)
_SECRETS: dict[str, tuple] = {
    "cloud_key": (
        _rx(f"(?:{'|'.join(_AWS_PREFIXES)})[A-Z0-9]{{16,}}"),
        _rx(r"AIza[0-9A-Za-z_\-]{35,}"),
        _rx(r"(?i)aws[A-Za-z_ \-]{0,30}(?:secret|private)[A-Za-z_ \-]{0,30}[\"']?\s*[=:]\s*"
            r"[\"']?(?P<v>[A-Za-z0-9/+]{40,})"),
        _rx(r"AccountKey=(?P<v>[A-Za-z0-9+/]{86}==)"),
        # Google's OAuth client secret and access token; Azure's Service Bus / IoT Hub
        # key, a SAS URL's signature, an Entra ID client secret ("Abc8Q~…").
        _rx(r"GOCSPX-[A-Za-z0-9_\-]{28}"),
        _rx(r"ya29\.[A-Za-z0-9_\-]{20,}"),
        _rx(r"SharedAccessKey=(?P<v>[A-Za-z0-9+/]{43}=)"),
        _rx(r"[?&]sig=(?P<v>[A-Za-z0-9%+/]{40,}(?:%3[Dd]|=){0,2})"),
        _rx(r"[A-Za-z0-9_\-.~]{3}[0-9]Q~[A-Za-z0-9_\-.~]{31,34}"),
        # AWS's secret key and session token without "aws" before them: STS's JSON
        # (`"SecretAccessKey": "…"`), `aws configure set aws_secret_access_key …`, a
        # Kubernetes env entry (`name: AWS_SECRET_ACCESS_KEY` then `value: …`), prose
        # ("Secret access key: …", "the secret is …").
        _rx(r"(?i)secret(?:[_ \-]?(?:access[_ \-]?)?key)?[\"']?(?:\s+is)?" + _KEY_VALUE_SEP
            + r"(?P<v>[A-Za-z0-9/+]{40})"),
        # ... or right after its key id: the console's CSV ("AKIA…,wJalr…"), a pair in
        # a line.
        _rx(r"(?:AKIA|ASIA)[A-Z0-9]{16}[\"']?(?:\s*[,;|:=]\s*|\s+)[\"']?"
            r"(?P<v>[A-Za-z0-9/+]{40})"),
        _rx(r"(?i)session_?token[\"']?" + _KEY_VALUE_SEP + r"(?P<v>[A-Za-z0-9/+]{100,}={0,2})"),
    ),
    "api_key": (
        _rx(r"(?:sk|rk)-(?:proj-|ant-(?:api|admin)[0-9]{2}-|svcacct-|admin-)?"
            r"[A-Za-z0-9_\-]{20,}"),
        _rx(r"[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"),
        _rx(r"hf_[A-Za-z0-9]{30,}"),
        # Other providers' keys by their prefixes: GitLab, Groq, xAI, Perplexity,
        # Replicate, Pinecone, LangSmith, Fireworks, Stripe's webhook secret, SendGrid,
        # npm, Shopify, DigitalOcean; a Telegram bot's token, a Discord webhook's.
        _rx(r"gl(?:pat|rt|dt|ptt|oas|soat|ft|cbt)-[A-Za-z0-9_\-]{20,}"),
        _rx(r"(?:gsk|whsec|npm)_[A-Za-z0-9]{30,}"),
        _rx(r"pcsk_[A-Za-z0-9]{4,8}_[A-Za-z0-9]{40,}"),
        _rx(r"(?:xai|pplx)-[A-Za-z0-9]{40,}"),
        _rx(r"r8_[A-Za-z0-9]{37}"),
        _rx(r"lsv2_(?:pt|sk)_[a-f0-9]{32}_[a-f0-9]{10}"),
        _rx(r"fw_[A-Za-z0-9]{24}"),
        _rx(r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}"),
        _rx(r"shp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}"),
        _rx(r"do[opr]_v1_[a-f0-9]{64}"),
        _rx(r"[0-9]{8,10}:AA[A-Za-z0-9_\-]{33}"),
        _rx(r"discord(?:app)?\.com/api/webhooks/[0-9]{17,20}/(?P<v>[A-Za-z0-9_\-]{60,})"),
        # PyPI, Databricks, Atlassian, Notion, Linear, Together.
        _rx(r"pypi-AgE[A-Za-z0-9_\-]{50,}"),
        _rx(r"dapi[a-f0-9]{32}"),
        _rx(r"ATATT3[A-Za-z0-9_\-=]{100,}"),
        _rx(r"(?:secret|ntn)_[A-Za-z0-9]{43,}"),
        _rx(r"lin_api_[A-Za-z0-9]{40}"),
        _rx(r"tgp_v1_[A-Za-z0-9_\-]{40,}"),
        *_NAMED_ONLY,
    ),
    "github_token": (_rx(r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,}"),
                     _rx(r"github_pat_[A-Za-z0-9_]{40,}")),
    "slack_token": (_rx(r"xox[abposre]-[A-Za-z0-9\-]{10,}"),
                    _rx(r"xapp-[0-9]-[A-Za-z0-9\-]{10,}"),
                    _rx(r"https://hooks\.slack\.com/(?:services|workflows|triggers)/"
                        r"[A-Za-z0-9_/\-]{20,}")),
    "jwt": (_rx(r"eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"),),
    # Armour lines in any case: retyped or lower-cased, they still frame a key.
    "private_key": (_rx(
        # (With key data between: "paste it between -----BEGIN PRIVATE KEY----- and
        # -----END PRIVATE KEY-----" holds none.)
        r"(?i)-{3,6}BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-{3,6}(?:[^\-\x00]|-[^\-\x00])*?"
        r"[A-Za-z0-9+/=]{16}(?:[^\-\x00]|-[^\-\x00])*?"
        r"-{3,6}END[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-{3,6}"
        # Truncated (no END line): the BEGIN line and the key lines that follow it, one
        # at least (a BEGIN line quoted alone, or a constant in code, is no key).
        r"|-{3,6}BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-{3,6}"
        r"(?:(?:\s|\\[nr])*(?:[A-Za-z0-9+/=]{16,}|[A-Za-z][A-Za-z-]*: [^\n\\\x00]*))+"
        # Truncated at the top (no BEGIN line): the key lines before the END line, all but
        # the last one of 16 characters at least, as prose words are not.
        r"|(?:[A-Za-z0-9+/=]{16,}(?:\s|\\[nr])+)+(?:[A-Za-z0-9+/=]{1,15}(?:\s|\\[nr])+)?"
        r"-{3,6}END[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-{3,6}"),
        # Private keys in other forms: PuTTY's .ppk (its private lines), WireGuard's
        # config, an age identity.
        _rx(r"Private-Lines: [0-9]+(?:\r?\n|\\r?\\n)(?P<v>[A-Za-z0-9+/=]{16,}"
            r"(?:(?:\r?\n|\\r?\\n)[A-Za-z0-9+/=]{16,})*)"),
        _rx(r"PrivateKey\s*=\s*(?P<v>[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=)"),
        _rx(r"AGE-SECRET-KEY-1[0-9A-Z]{58}"),
        # A key's DER base64 under its name ("private_key: MIIE…", a JSON key's label).
        # (DER starts with a SEQUENCE, "M" in base64: "MII…", "MHc…", "MC4…"; over the
        # lines it is wrapped at.)
        _rx(r"(?i)private[_ \-]?key[\"']?" + _KEY_VALUE_SEP
            + r"(?P<v>M[A-Za-z0-9+/]{59,}={0,2}(?:(?:\r?\n|\\r?\\n)"
            r"(?:[A-Za-z0-9+/]{4,}={0,2}|[A-Za-z0-9+/]{2,3}={1,2}))*)")),
    # A URL's password (a database's, a broker's: "postgres://app:…@db:5432"), and one
    # under its name: "password=…", "Password=…;" in a connection string, `pwd: …`.
    "password": (
        # (Never a NUL: units, a JSON key and its value, are joined by one.)
        _rx(r"[A-Za-z][A-Za-z0-9+.\-]{1,20}://[^\s:/@?#\[\]\"'<>\x00]{0,64}:"
            r"(?P<v>[^\s:/@?#\[\]\"'<>\x00]{1,128})@[A-Za-z0-9\[]"),
        # Quoted ('password = "…"', '"pwd": "…"'), or right after its name unquoted (an
        # env file, a connection string, YAML): not code's `password = get(...)`.
        _rx(rf"(?i)(?:{_PASS_QUOTED})[\"']?\]?\s*[=:]\s*[\"']"
            r"(?P<v>[^\s\"'\x00]{1,128})[\"']"),
        _rx(rf"(?i)(?:{_PASS_BARE})"
            r"(?P<v>[^\s\"',;&<>\[\](){}:\x00]{1,128})"),
        # SQL's `WITH PASSWORD '…'`, `IDENTIFIED BY '…'` (quoted: not `password VARCHAR`),
        # also MySQL's `IDENTIFIED WITH caching_sha2_password BY '…'`.
        _rx(rf"(?i)\b(?:password|{_IDENTIFIED_BY})[ \t]+'(?P<v>[^'\s\x00]{{1,128}})'"),
        *_IDENTIFIED_ONLY,
        # `Pwd=` only as a connection string's field: `PWD` is also the shell's
        # working directory.
        _rx(r"(?im)(?:^|[;?&_])[ \t]*pwd[ \t]*=[ \t]*(?P<v>[^\s\"';&\x00]{1,128})"),
        # After its name and a space only as a command's flag (`--password …`,
        # `-storepass …`), in .netrc (`login … password …`) and nmcli's `wifi … password`:
        # not `reset-password HTTP/1.1` nor SQL's `password VARCHAR(255)`.
        _rx(r"(?i)(?:^|[ \t])--?(?:password|passwd|passphrase|(?:src|dest)?storepass|keypass)"
            r"[ \t]+[\"']?(?P<v>[^\s\"'\-\x00][^\s\"'\x00]{0,127})"),
        _rx(r"(?i)\b(?:(?:machine[ \t]+[^\s\x00]+|default)\s+login[ \t]+[^\s\x00]+\s+"
            r"|wifi\b[^\n\x00]{0,100}?[ \t]+)password"
            r"[ \t]+[\"']?(?P<v>[^\s\"'\x00]{1,128})"),
        # openssl's `-passin pass:…`.
        _rx(r"-pass(?:in|out)?[ \t]+[\"']?pass:(?P<v>[^\s\"'\x00]{1,128})"),
        # A command's own flag, its letter's case as the command reads it: mysql's `-p…`
        # (glued: `-p db` prompts, and db is a database; `-P` is a port), sshpass's,
        # docker login's and mongosh's `-p …`, ldapsearch's `-w` (`-W` prompts),
        # redis-cli's `-a` (`-p` is a port), curl's `-u user:…`.
        # (The command itself, not a path's directory: `find /etc/mysql -print0`. A
        # command starts a line or follows a shell separator, or it is run from a `bin`
        # directory, the current one or one in a variable: `./mysql`, `$BIN/mysql`,
        # `C:\mysql\bin\mysql.exe`.)
        _rx(rf"(?m)(?:^|[\s(`\"'|;&]|bin[/\\]|\.[/\\]|\$\{{?\w+\}}?[/\\]|%[/\\])"
            rf"(?:mysql[a-z]*|mariadb)\b{_SAME_COMMAND}-p[\"']?"
            r"(?P<v>[^\s\"'\-\x00][^\s\"'\x00]{0,127})"),
        _rx(rf"\b(?:(?:docker|podman|nerdctl|buildah) login|sshpass|mongo[a-z]*)\b"
            rf"{_SAME_COMMAND}-p[ \t]*[\"']?(?P<v>[^\s\"'\-\x00][^\s\"'\x00]{{0,127}})"),
        _rx(rf"\bldap[a-z]+\b{_SAME_COMMAND}-w[ \t]*[\"']?"
            r"(?P<v>[^\s\"'\-\x00][^\s\"'\x00]{0,127})"),
        _rx(rf"\bredis-cli\b{_SAME_COMMAND}-a[ \t]*[\"']?"
            r"(?P<v>[^\s\"'\-\x00][^\s\"'\x00]{0,127})"),
        _rx(rf"\bcurl\b{_SAME_COMMAND}(?:-u|--user)[ \t=]*[\"']?[^\s:\"'\x00]{{0,64}}:"
            r"(?P<v>[^\s\"'\x00]{1,128})"),
        *_BASIC_AUTH,
    ),
}


def _literal_set():
    """The secret classes' literals alone, for text the scanner's Set has not seen."""
    literals = re2.Set.SearchSet(re2_options())
    for cls in _SECRET_LITERALS:
        literals.Add(_SET_PATTERNS[_SECRET_SET_NAMES[cls]])
    literals.Compile()
    return literals


_SECRET_SET = _literal_set()
_SECRET_CLASSES = tuple(_SECRET_LITERALS)  # by their index in _SECRET_SET

# -- small Python patterns on bounded slices ---------------------------------------------

_DATE = re.compile(rb"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_DOTTED4 = re.compile(rb"\d{1,3}(?:\.\d{1,3}){3}")
_GROUP = re.compile(rb"[0-9]+")
# Between the 4-digit groups of a card: a space, or two or three (copied from a form or
# aligned in a table), or one dash with a space or two around it ("4111 - 1111 - ...").
# One dash only, and no more spacing than a run allows: a longer gap, or a dash run, is
# not a card's grouping. Only a single space makes a 4-digit group before the card one of
# its groups: "exp 1227  4111 1111 1111 1111" starts at 4111.
_SPACED = frozenset((b" ", b"  ", b"   ", b" -", b"- ", b" - ", b"  -", b"-  "))
_SSN_SHAPE = re.compile(rb"\d{3}([-./ ])\d{2}\1\d{4}")
# What makes four dotted numbers a version or a section, not an address: a word for it
# before them (also as an XML tag or a call, `<Version>`, `Version("`), or a browser's
# product token (`Chrome/120.0.0.0`, as every Chrome user agent ends).
_VERSION_CTX = re.compile(r"(?:(?i:\bv|\bver|version|build|release|\brev|\bsection|"
                          r"\bsect|§|\bchapter|\bclause|\bparagraph|\bfig(?:ure)?\b)"
                          r"[\s.:>#]*(?:[(=][\"']?)?|"
                          # A version's key or name: `"version": "`, `__version__ = "`.
                          r"(?i:version)_*[\"']?\s*[:=]\s*[\"']|"
                          r"(?:Chrome|Chromium|CriOS|Safari|Firefox|FxiOS|Edg[A-Z]?|OPR|"
                          r"Version|AppleWebKit|Gecko|YaBrowser|SamsungBrowser|Electron)/)$")
_PHONE_LIST_CTX = re.compile(r"(?i)(?:phone|\bt[ée]l|mobile|\bcell|\bfax|whatsapp|\bsms|contact|"
                             r"telefon|t[ée]l[ée]phone|handy|portable|celular|cellulare)"
                             r"[^0-9]*\Z")
# Searched in lower case (a case-blind search of this many words takes half again as long).
_POS_CTX = re.compile(r"phone|\bt[ée]l\b|mobile|\bcell|\bfax\b|\bcall|whatsapp|\bsms\b|"
                        r"contact|reach|dial|telefon|t[ée]l[ée]phone|handy|portable|"
                        r"celular|cellulare|numero|n[úu]mero|"
                        # "call me", "text me" in Portuguese, Spanish, French, German, Italian
                        r"\bligar\b|\bme lig(?:a|ue)\b|\bchama\b|mensagem|"
                        r"\bll[aá]m(?:ame|ar|e)\b|\bappel|anruf|\bchiam")
# Words after which a bare number is an identifier ("Order No. 0612...", "tracking number
# 0546...", "#0612..."), unless a word like "phone" or "card" is also near.
_NEG_WORDS = (
    "order|invoice|inv|ref|reference|id|no|nr|num|tracking|account|"
    "acct|ticket|case|po|sku|serial|transaction|txn|confirmation|conf|booking|reservation|"
    "customer|member|policy|claim|isbn|ean|upc|gtin|build|version|ver|pin|zip|postcode|"
    "code|item|article|batch|lot|rechnung|bestellung|auftrag|facture|commande|pedido|"
    "factura|ordine|fattura|contract|vertrag|page|release|rev")
_CARD_CTX = re.compile(r"(?i)card|karte|carte|tarjeta|cart[aã]o|visa|master|amex|maestro|"
                       r"credit|debit|\bcc\b|\bpan\b|\bpay")
# A WhatsApp click-to-chat link holds an international number without its '+'.
_WA_ME = b"wa.me/"
_INTL_CTX = re.compile(r"(?i)msisdn|e\.?164|wa\.me/")
# A word naming a phone number before one, a few words or signs between them on its
# line: `Tel 442079460958`, "my phone is", "Phone (mobile):", a JSON text's `"phone": "`.
_PHONE_WORD_BEFORE = re.compile(
    r"(?i)\b(?:phone|tel|telephone|mobile|cell|fax|whatsapp|handy|telefon|t[ée]l[ée]phone)"
    r"s?\b[^0-9\n]{0,20}$")
_US_STATE_BEFORE = re.compile(
    r"\b(?:A[KLRZ]|C[AOT]|D[CE]|FL|GA|HI|I[ADLN]|K[SY]|LA|M[ADEINOST]|N[CDEHJMVY]|O[HKR]|"
    r"PA|PR|RI|S[CD]|T[NX]|UT|V[AT]|W[AIVY]),?[ \t\n\u00a0]{1,4}$")
# Money, which a national number with thousands separators looks like: a currency right
# after it (its decimals between: "612.345.678,00 EUR") or right before it. A decimal
# comma alone is no sign: a CSV row's next field reads alike ("Jane,0612345678,3").
_CURRENCY_CODES = ("eur|usd|gbp|chf|jpy|cny|rmb|inr|brl|pln|sek|nok|dkk|czk|huf|aud|cad|"
                   "nzd|hkd|sgd|mxn|zar|rub|try|krw")
_AMOUNT_AFTER = re.compile(rf"(?:,[0-9]{{1,2}})?[ \u00a0]?(?:[€£¥₹₽₩₺₪]|zł|"
                           rf"(?i:{_CURRENCY_CODES}|euros?|kr)\b)")
_AMOUNT_BEFORE = re.compile(rf"(?:[€$£¥₹₽₩₺₪]|\b(?i:{_CURRENCY_CODES}|kr))[ \u00a0]?$")
# "ssn" also ends an identifier's words ("user_ssn"), where \b does not see it start.
_SSN_CTX = re.compile(r"(?i)(?<![a-z])ssn|social security|soc\.? ?sec|taxpayer|\btin\b|\bitin\b")


# JSON keys that name a class written in digits, word by word ("cc_number", "phoneNumber",
# "MSISDN"): whole words only, so "cardinality", "payload" or "discard" name nothing.
_KEY_CLASS_WORDS: dict[str, str] = {
    **dict.fromkeys((
        "phone", "phones", "phonenumber", "phoneno", "tel", "telephone", "telefon",
        "telefono", "telefone", "telephono", "mobile", "mobil", "mobilephone", "mobileno",
        "cell", "cellphone", "cellular", "fax", "whatsapp", "sms", "handy",
        "portable", "celular", "cellulare", "landline", "tfn", "téléphone", "contact",
        "contacts", "callback", "call", "caller", "dial", "reach", "numero", "número"),
        "phone"),
    "msisdn": "msisdn", "e164": "msisdn",
    **dict.fromkeys((
        "card", "cards", "cardnumber", "cardno", "cardnum", "cc", "ccn", "ccnum", "ccnumber",
        "ccno", "pan", "creditcard", "debitcard", "visa", "mastercard", "amex", "maestro",
        "karte", "kreditkarte", "carte", "tarjeta", "cartao", "cartão", "credit", "debit",
        "pay", "payment"), "card"),
    **dict.fromkeys(("ssn", "ssns", "itin", "tin", "taxpayer", "taxid", "socialsecurity",
                     "socialsecuritynumber", "socsec"), "ssn"),
}
# Words that make a key hold something else than the value itself, even with a class
# word in it ("phone_id", "card_count", "mobile_last_seen", "call_started_at"): times,
# counts, sizes, ids, amounts, kinds and flags.
_KEY_OTHER_WORDS = frozenset((
    "id", "ids", "uuid", "guid", "key", "hash", "token", "count", "counts", "amount",
    "amounts", "total", "sum", "cents", "price", "fee", "balance", "limit", "at", "on",
    "ms", "ns", "us", "sec", "secs", "seconds", "ts", "time", "times", "timestamp",
    "date", "dates", "day", "days", "seen", "last", "created", "updated", "started",
    "ended", "expires", "expiry", "exp", "duration", "bytes", "size", "len", "length",
    "index", "idx", "type", "kind", "status", "verified", "valid", "enabled", "is", "has",
    "country", "region", "brand", "network", "bin", "iin", "level", "version", "score"))
# Cheap first look: a key none of whose letters spell the start of a class word names none.
_KEY_HINT = re.compile(r"(?i)ph|te|mob|cel|fax|msisdn|wh|sms|han|por|land|tfn|car|cc|pan|"
                       r"visa|mast|amex|mae|kart|tarj|ssn|tin|tax|soc|cont|cal|dial|reach|"
                       r"n[uú]m|cred|deb|pay|e\.?164")
_KEY_SPLIT = re.compile(r"[\W_]+|(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=[0-9])")
# A key naming AWS's secret key or session token ("SecretAccessKey" in STS's answer,
# "aws_secret_access_key"): its value is read with the key's name as its label.
_SECRET_KEY_NAME = re.compile(
    r"(?i)(?:aws_?)?(?:secret_?(?:access_?)?key|(session_?token))|(private_?key)"
    r"|(?:[a-z0-9]+_?)?(passw(?:or)?d|passphrase|pwd)"
    r"|(?:[a-z0-9]+_?)?(api_?key|api_?token|access_?token|auth_?token|client_?secret)")
# "e164" / "e.164" read as "msisdn" before letters and digits are split apart.
_KEY_E164 = re.compile(r"(?i)(?<![a-z0-9])e\.?164(?![0-9])")
# Other-words that leave the key of an SSN or TIN naming it: "taxpayer_id", "tax_id".
_KEY_ID_WORDS = frozenset(("id", "ids"))


def key_class(key: str) -> str | None:
    """The class a JSON key names ("phone", "card", "ssn", "msisdn": a phone number in
    international form without its '+'; "secret_key", "session_token": AWS's, whose
    values hold no "aws" to tell them; "private_key", "password", "api_key": values read
    under their key's name), "" for a key that holds
    something else than the value even if it names a class ("phone_id", "card_count"),
    None for any other key."""
    secret = _SECRET_KEY_NAME.fullmatch(key)
    if secret is not None:
        return "session_token" if secret.group(1) else "private_key" if secret.group(2) \
            else "password" if secret.group(3) else "api_key" if secret.group(4) \
            else "secret_key"
    if _KEY_HINT.search(key) is None:
        return None
    words = _KEY_SPLIT.sub(" ", _KEY_E164.sub(" msisdn ", key)).lower().split()
    found = None
    other = False  # only an id word ("taxpayer_id"): it names an SSN or TIN all the same
    prev = ""
    for w in words:
        if w in _KEY_OTHER_WORDS and not (w == "sec" and prev == "soc"):
            if w not in _KEY_ID_WORDS:
                return ""
            if prev == "tax":
                found = "ssn"  # "tax_id"
            other = True
        else:
            c = _KEY_CLASS_WORDS.get(w)
            if c is not None:
                found = c
            elif ((w == "security" and prev == "social") or (w == "sec" and prev == "soc")
                  or (prev == "tax" and w in ("no", "nr", "num", "number"))):
                found = "ssn"
        prev = w
    if other and found != "ssn":
        return ""
    return found


# -- payment cards ------------------------------------------------------------------------

# (prefix low, prefix high, lengths) — prefixes compared on the same number of digits.
_R = range
_CARD_RANGES: tuple[tuple[str, str, frozenset[int]], ...] = tuple(
    (lo, hi, frozenset(lengths)) for lo, hi, lengths in (
        ("4", "4", (13, 16, 19)),                         # Visa (incl. Electron)
        ("51", "55", (16,)), ("2221", "2720", (16,)),     # Mastercard, 2-series
        ("34", "34", (15,)), ("37", "37", (15,)),         # American Express
        ("6011", "6011", _R(16, 20)), ("644", "649", _R(16, 20)), ("65", "65", _R(16, 20)),
        ("622126", "622925", _R(16, 20)),                 # Discover
        ("300", "305", _R(14, 20)), ("3095", "3095", _R(14, 20)),
        ("36", "36", _R(14, 20)), ("38", "39", _R(14, 20)),  # Diners Club
        ("3528", "3589", _R(15, 20)), ("35", "35", _R(16, 20)), ("2131", "2131", (15,)),
        ("1800", "1800", (15,)),                          # JCB (incl. legacy 15-digit)
        ("62", "62", _R(16, 20)), ("81", "81", _R(16, 20)),  # UnionPay
        ("50", "50", _R(12, 20)), ("56", "69", _R(12, 20)),  # Maestro
        ("2200", "2204", _R(16, 20)),                     # Mir
        ("2205", "2205", (16,)),                          # BORICA
        ("60", "60", (16,)), ("82", "82", (16,)), ("508", "508", (16,)),
        ("353", "353", (16,)), ("356", "356", (16,)),     # RuPay
        ("506099", "506198", (16, 18, 19)), ("650002", "650027", (16, 18, 19)),  # Verve
        ("9792", "9792", (16,)),                          # Troy
        ("5019", "5019", (16,)),                          # Dankort
        ("636", "636", _R(16, 20)), ("637", "639", (16,)),  # InterPayment, InstaPayment
        ("357111", "357111", (16,)),                      # LankaPay
        ("1", "1", (15,)),                                # UATP
    ))


def _brand_table() -> dict[int, tuple[list[int], list[int]]]:
    """Per card length: merged ranges of 6-digit prefixes that some brand issues."""
    spans_by_len: dict[int, list[tuple[int, int]]] = {}
    for lo, hi, lengths in _CARD_RANGES:
        lo6, hi6 = int(lo.ljust(6, "0")), int(hi.ljust(6, "9"))
        for n in lengths:
            spans_by_len.setdefault(n, []).append((lo6, hi6))
    table = {}
    for n, ranges in spans_by_len.items():
        merged: list[list[int]] = []
        for lo6, hi6 in sorted(ranges):
            if merged and lo6 <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi6)
            else:
                merged.append([lo6, hi6])
        table[n] = ([m[0] for m in merged], [m[1] for m in merged])
    return table


_BRANDS = _brand_table()


def card_brand_ok(digits: str) -> bool:
    table = _BRANDS.get(len(digits))
    if table is None:
        return False
    prefix = int(digits[:6])
    i = bisect_right(table[0], prefix) - 1
    return i >= 0 and prefix <= table[1][i]


_LUHN_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_ok(digits: str) -> bool:
    b = digits.encode()
    return (sum(b[-1::-2]) + sum(b[-2::-2].translate(_LUHN_DOUBLED)) - 48 * len(b)) % 10 == 0


def card_ok(digits: str) -> bool:
    return 12 <= len(digits) <= 19 and card_brand_ok(digits) and luhn_ok(digits)


# -- SSN ----------------------------------------------------------------------------------

def ssn_ok(area: str, group: str, serial: str) -> bool:
    if len(area) != 3 or len(group) != 2 or len(serial) != 4:
        return False
    a = int(area)
    if a == 0 or a == 666 or a >= 900:
        return False
    if group == "00" or serial == "0000":
        return False
    # Numbers published in advertising and never issued.
    return f"{area}{group}{serial}" not in ("078051120", "219099999")


# -- IBAN ---------------------------------------------------------------------------------

IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}


def iban_ok(iban: str) -> bool:
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    if not "02" <= iban[2:4] <= "98":
        return False
    rearranged = iban[4:] + iban[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _iban_at(asc: bytes, s: int, bounds: frozenset[int]) -> tuple[int, str] | None:
    """The IBAN starting at `s`: its end and value, or None.

    Written bare or in groups of four (the print format) with one kind of separator; all
    letters in one case. The country fixes the length, so nothing after it is swallowed.
    """
    length = IBAN_LENGTHS.get(asc[s:s + 2].upper().decode())
    if length is None:
        return None
    sep = asc[s + 4:s + 5]
    if sep in (b" ", b"-"):
        nsep = (length - 1) // 4
        span = length + nsep
        chunk = asc[s:s + span]
        if len(chunk) != span or chunk[4::5] != sep * nsep:
            return None
        raw = chunk.replace(sep, b"")
    else:
        span = length
        raw = asc[s:s + span]
    end = s + span
    if (len(raw) != length or not raw.isalnum()
            or (end < len(asc) and asc[end] in _ALNUM and end not in bounds)):
        return None
    value = raw.decode()
    if not (value.isupper() or value.islower()) and not value[4:].isdigit():
        return None
    value = value.upper()
    return (end, value) if iban_ok(value) else None


# -- phone numbers ------------------------------------------------------------------------

_NANP_CC = 1
# Regions where numbers are commonly written nationally without the trunk prefix.
_TRUNK_OPTIONAL = frozenset({"BR", "IN", "CN"})
_MOBILE = (phonenumbers.PhoneNumberType.MOBILE,
           phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE)


class PhoneValidator:
    """Confirms phone candidates with libphonenumber metadata, without its slow parser.

    Candidates arrive as digit strings; the national prefix is stripped per region and the
    number is checked with `is_valid_number[_for_region]` (the same validity rules as
    `phonenumbers.parse` + `is_valid_number`, at a fraction of the cost).
    """

    def __init__(self, regions: tuple[str, ...]):
        self.regions: list[tuple[str, int, str | None, frozenset[int], bool]] = []
        for region in regions:
            meta = PhoneMetadata.metadata_for_region(region)
            if meta is None:
                continue
            prefix = meta.national_prefix or None
            lengths = frozenset(meta.general_desc.possible_length or ())
            optional = (prefix is None or meta.country_code == _NANP_CC
                        or region in _TRUNK_OPTIONAL)
            self.regions.append((region, meta.country_code, prefix, lengths, optional))

    def check(self, digits: str, intl: bool, bounds: tuple[int, ...],
              budget: Budget) -> str | None:
        """E.164 form of a valid number, or None. `bounds`: digit offsets where the
        written groups end (empty for a bare digit string)."""
        key = (digits, intl, bounds)
        memo = budget.memo
        if key in memo:
            return memo[key]
        result = self._check(digits, intl, bounds, budget)
        memo[key] = result
        return result

    def _check(self, digits: str, intl: bool, bounds: tuple[int, ...],
               budget: Budget) -> str | None:
        if intl:
            d = digits[2:] if digits.startswith("00") else digits
            for k in (1, 2, 3):
                cc = int(d[:k]) if len(d) > k else -1
                if cc in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
                    break
            else:
                return None
            nsn = d[k:]
            candidates = [nsn]
            main = phonenumbers.COUNTRY_CODE_TO_REGION_CODE[cc][0]
            meta = PhoneMetadata.metadata_for_region(main)
            prefix = meta.national_prefix if meta is not None else None
            if prefix and nsn.startswith(prefix):
                candidates.append(nsn[len(prefix):])
            for c in candidates:
                if not 4 <= len(c) <= 17 or not budget.spend(4):
                    continue
                if phonenumbers.is_valid_number(_number(cc, c)):
                    return f"+{cc}{c}"
            return None
        nanp_done = False
        for region, cc, prefix, lengths, optional in self.regions:
            nsns = []
            if prefix and digits.startswith(prefix):
                nsns.append((digits[len(prefix):], False))
            if optional:
                # Without the trunk prefix, in regions where that is only customary for
                # some numbers, the written form must fit: a bare digit string must be a
                # mobile number (landline-shaped ones are too often timestamps or ids),
                # and groups must fall where the region groups ("(123) 456-7890" is not
                # the Brazilian "(12) 3456-7890").
                nsns.append((digits, region in _TRUNK_OPTIONAL))
            for nsn, strict in nsns:
                if len(nsn) not in lengths:
                    continue
                if cc == _NANP_CC:
                    if nanp_done:
                        continue
                    nanp_done = True
                    if not budget.spend(4):
                        return None
                    if phonenumbers.is_valid_number(_number(cc, nsn)):
                        return f"+1{nsn}"
                    continue
                if not budget.spend(4):
                    return None
                number = _number(cc, nsn)
                if not phonenumbers.is_valid_number_for_region(number, region):
                    continue
                if strict and not (_grouping_ok(number, bounds) if bounds else
                                   phonenumbers.number_type(number) in _MOBILE):
                    continue
                return f"+{cc}{nsn}"
        return None


def _grouping_ok(number: PhoneNumber, bounds: tuple[int, ...]) -> bool:
    """Do the written group boundaries fall where the region's own format puts them?"""
    formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    ends: set[int] = set()
    count = 0
    in_digits = False
    for ch in formatted:
        if ch.isdigit():
            count += 1
            in_digits = True
        else:
            if in_digits:
                ends.add(count)
            in_digits = False
    extra = count - len(phonenumbers.national_significant_number(number))  # trunk digits
    return all(b + extra in ends for b in bounds)


def _number(cc: int, nsn: str) -> PhoneNumber:
    zeros = len(nsn) - len(nsn.lstrip("0"))
    if zeros:
        return PhoneNumber(country_code=cc, national_number=int(nsn or "0"),
                           italian_leading_zero=True, number_of_leading_zeros=zeros)
    return PhoneNumber(country_code=cc, national_number=int(nsn))


# -- the scanner --------------------------------------------------------------------------



def utf8_safe(text: str) -> str:
    """`text` as pyre2 can take it. pyre2 encodes a str as strict UTF-8, and lone
    surrogates do get here (a JSON body may escape them; normalize keeps them): each
    becomes U+FFFD, one character for one, so offsets hold."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return SURROGATE.sub("\ufffd", text)
    return text


def _wide(ch: str) -> bool:
    """A CJK character (East Asian wide or fullwidth): text in those scripts has no
    spaces between words."""
    return ch > "\u10ff" and unicodedata.east_asian_width(ch) in ("W", "F")


def _in_address(a: int, ch: str, latin: frozenset[str], wide: bool) -> bool:
    """Whether `ch` (`a` in the ASCII text the regex matched, '?' for what is not ASCII)
    may be part of an address whose characters are `wide` or not; the regex has already
    matched the ASCII ones."""
    if a != 63:
        return not wide or a in b".-" or not ch.isalnum()
    if ch in latin:
        return not wide
    return ch.isalnum() and _wide(ch) == wide


class Scanner:
    """All enabled detectors, compiled once per config snapshot."""

    def __init__(self, settings: RedactionSettings):
        classes = set(settings.classes)
        self.classes = classes
        self.phone = PhoneValidator(settings.phone_regions) if "phone" in classes else None
        # Every custom pattern is compiled, enabled or not: settings built without
        # validation (model_construct) must still fail here on a bad one.
        compiled = [(d.name, compile_custom(d.pattern, d.case_insensitive))
                    for d in settings.custom_detectors]
        self.customs: list[tuple[str, object]] = [c for c in compiled if c[0] in classes]
        families = {
            "email": "email" in classes,
            "digits": bool(classes & {"card", "ssn", "phone"}),
            "card_sep": "card" in classes,
            "ipv4": "ipv4" in classes,
            "ipv6": "ipv6" in classes,
            "iban": "iban" in classes,
            **{_SECRET_SET_NAMES[cls]: cls in classes for cls in _SECRETS},
            "placeholder": True,
            "data_uri": True,
        }
        self._set = re2.Set.SearchSet(re2_options())
        self._set_names: list[str] = []
        for name, on in families.items():
            if on:
                self._set.Add(_SET_PATTERNS[name])
                self._set_names.append(name)
        self._set.Compile()
        self._custom_set = None
        if self.customs:
            cset = re2.Set.SearchSet(re2_options())
            for d in settings.custom_detectors:
                if d.name in classes:
                    cset.Add(f"(?i:{d.pattern})" if d.case_insensitive else d.pattern)
            try:
                cset.Compile()
                self._custom_set = cset
            except re2.error:  # pragma: no cover - too big for one DFA: run each always
                self._custom_set = None
        self._priority = {c: i for i, c in enumerate(_PRIORITY)}
        custom_rank = self._priority["*custom*"]
        for name, _ in self.customs:
            self._priority[name] = custom_rank
        self.latin = latin_letters()

    # ---------------------------------------------------------------------------------

    def scan(self, norm: Normalized, budget: Budget,
             bounds: frozenset[int] = frozenset()) -> ScanResult:
        """Findings in `norm`. `bounds`: normalised offsets where one text part of a unit
        ends and the next begins. Matching runs across them (a value split over two parts
        is still found), but they count as word boundaries: "My card is" + "4111 ..." is
        not a number glued to a word."""
        text = norm.text
        asc = text.encode() if text.isascii() else text.encode("ascii", "replace")
        res = ScanResult()
        if budget.exhausted:  # normalisation already spent it all
            res.incomplete = True
            return res
        hits = self._set.Match(asc)
        custom_hits: list[int] | None = None
        ctext = text
        if self.customs:
            ctext = utf8_safe(text)
            if self._custom_set is None:
                custom_hits = list(range(len(self.customs)))
            else:
                custom_hits = self._custom_set.Match(ctext)
        iban_at_bounds = bool(bounds) and "iban" in self.classes
        if not hits and not custom_hits and not iban_at_bounds:
            return res
        names = {self._set_names[i] for i in hits or ()}
        found = res.found
        skips: list[tuple[int, int]] = []
        if "data_uri" in names:
            for m in spans(_DATA_URI, asc):
                s, e = m[0]
                # Data, as an image's is; a few words after a data: prefix are text that
                # would hide a key or a card number behind it.
                if e - asc.index(b",", s, e) > _DATA_PAYLOAD_MIN:
                    res.data_uris += 1
                    skips.append(m[0])
        if "placeholder" in names:
            for m in spans(_PLACEHOLDER, asc):
                res.reserved.add(text[m[0][0]:m[0][1]])
        self._secrets(asc, text, names, found, budget, bounds, norm.soft)
        if "email" in names:
            self._emails(asc, text, found, budget, bounds)
        if "iban" in names:
            self._ibans(asc, found, budget, bounds)
        if iban_at_bounds:
            # The pattern's \b cannot see a part boundary ("IBAN" + "DE89..."); only
            # those, where a letter or digit comes before, need a look of their own.
            for b in bounds:
                if b and asc[b - 1] in _ALNUM and budget.spend(3):
                    end = _iban_at(asc, b, bounds)
                    if end is not None:
                        found.append(Found("iban", b, end[0], end[1]))
        if "ipv4" in names:
            self._ipv4(asc, text, found, budget, bounds)
        if "ipv6" in names:
            self._ipv6(asc, found, budget, bounds)
        if "digits" in names:
            self._digit_runs(asc, text, found, budget, bounds)
        if "card_sep" in names:
            self._sep_cards(asc, found, budget, bounds)
        for i in custom_hits or ():
            name, rx = self.customs[i]
            for m in rx.finditer(ctext):
                if not budget.spend():
                    break
                s, e = m.span()
                cut = text.find("\x00", s, e)
                if cut != -1:
                    e = cut
                if e > s:
                    found.append(Found(name, s, e, text[s:e]))
        res.incomplete = budget.exhausted
        res.found = self._resolve(found, skips, len(asc), self._priority)
        return res

    @staticmethod
    def _resolve(found: list[Found], skips: list[tuple[int, int]], size: int,
                 rank: dict[str, int]) -> list[Found]:
        """Keep the higher-priority finding where two overlap; drop those in skip spans.
        Linear in the text: each kept finding marks its characters once."""
        if len(found) <= 1 and not skips:
            return found
        found.sort(key=lambda f: (rank[f.cls], f.start, f.start - f.end))
        taken = bytearray(size)
        for s, e in skips:
            taken[s:e] = b"\x01" * (e - s)
        out: list[Found] = []
        for f in found:
            if taken.find(1, f.start, f.end) != -1:
                continue
            taken[f.start:f.end] = b"\x01" * (f.end - f.start)
            out.append(f)
        out.sort(key=lambda f: f.start)
        return out

    # -- families ------------------------------------------------------------------------

    def _secrets(self, asc: bytes, text: str, names: set[str], found: list[Found],
                 budget: Budget, bounds: frozenset[int],
                 soft: list[tuple[int, int]]) -> None:
        classes = [cls for cls in _SECRETS if _SECRET_SET_NAMES[cls] in names]
        for cls, s, e, check in _secret_matches(asc, asc, classes, budget, bounds):
            value = text[s:e]
            if _secret_ok(cls, value, check):
                found.append(Found(cls, s, e, value))
        gaps = _token_gaps(asc, soft, budget)
        if not gaps:
            return
        # Again with the soft spaces between token characters taken out, as normalising
        # takes out a zero-width space: "ghp_abc\u00a0def..." is one token. Only matches
        # that run over such a space are new.
        joined = b"".join(asc[a:b] for a, b in _kept(gaps, 0, len(asc)))
        hit = _SECRET_SET.Match(joined) or ()
        classes = [cls for cls in map(_SECRET_CLASSES.__getitem__, hit) if cls in self.classes]
        starts = [a for a, _, _ in gaps]
        for cls, s, e, check in _secret_matches(joined, asc, classes, budget, bounds,
                                                     gaps):
            k = bisect_right(starts, s)
            if k == len(starts) or starts[k] >= e:
                continue
            value = "".join(text[a:b] for a, b in _kept(gaps, s, e))
            if _secret_ok(cls, value, check):
                found.append(Found(cls, s, e, value))

    def _emails(self, asc: bytes, text: str, found: list[Found], budget: Budget,
                bounds: frozenset[int]) -> None:
        latin = self.latin
        for m in spans(_EMAIL, asc):
            if not budget.spend():
                return
            s, e = m[0]
            at = asc.index(b"@", s, e)
            # Local part: walk left from '@' while the characters belong to an address.
            # Letters of any script do ("иван@почта.рф", a Cyrillic homoglyph in "example.com"),
            # but one address is all wide (CJK) or all narrow: text without spaces puts
            # "请联系alice@example.com谢谢" around an address.
            wide = at > s and _wide(text[at - 1])
            i = at
            while i > s and _in_address(asc[i - 1], text[i - 1], latin, wide):
                i -= 1
            while i < at and asc[i] in b".-+%":
                i += 1
            if i == at or not any(ch.isalnum() for ch in text[i:at]):
                continue
            if i > 0 and asc[i - 1] in _ALNUM and i not in bounds:
                continue
            # Domain: stop where the address's characters end, then drop a trailing
            # partial label.
            wide = at + 1 < e and _wide(text[at + 1])
            j = at + 1
            while j < e and _in_address(asc[j], text[j], latin, wide):
                j += 1
            domain = text[at + 1:j].rstrip(".-")
            labels = domain.split(".")
            if len(labels) > 2 and _past_the_domain(labels[-2], labels[-1]):
                # An image's scale before its variant is a file's name: "icon@2x.dark.png".
                if _SCALE.fullmatch(labels[0]) and labels[-1].lower() in _FILE_EXTENSIONS:
                    continue
                labels.pop()
                domain = domain[:domain.rindex(".")]
            if len(labels) < 2 or any(not lb or lb[0] == "-" or lb[-1] == "-"
                                      for lb in labels):
                continue
            tld = labels[-1]
            if len(labels) == 2 and tld.lower() in _FILE_EXTENSIONS:
                continue  # a file's name: "icon@2x.png", "getty@tty1.service"
            # A TLD is letters, or an internationalized one in its ASCII form (.xn--p1ai).
            if len(tld) < 2 or not (tld.isalpha() or tld[:4].lower() == "xn--"):
                continue
            end = at + 1 + len(domain)
            if end < len(asc) and end not in bounds and (
                    asc[end] in _ALNUM or (asc[end] == 63 and text[end] in latin)):
                continue
            found.append(Found("email", i, end, text[i:end].lower()))

    def _ibans(self, asc: bytes, found: list[Found], budget: Budget,
               bounds: frozenset[int]) -> None:
        pos = 0
        while True:
            m = search(_IBAN, asc, pos)
            if m is None or not budget.spend(3):
                return
            s = m[0][0]
            end = _iban_at(asc, s, bounds)
            if end is None:
                pos = s + 1
                continue
            found.append(Found("iban", s, end[0], end[1]))
            pos = end[0]

    def _ipv4(self, asc: bytes, text: str, found: list[Found], budget: Budget,
              bounds: frozenset[int]) -> None:
        n = len(asc)
        pos = 0
        while True:
            m = search(_IPV4, asc, pos)
            if m is None or not budget.spend(2):
                return
            s, e = m[0]
            pos = e
            if s > 0 and (asc[s - 1] == 46  # '.': part of a longer dotted sequence
                          or (asc[s - 1] in _ALNUM and s not in bounds)):
                # Inside a word or a number; an address may still start at a part
                # boundary within this match ("v1" + "0.0.0.1").
                pos = s + 1
                continue
            if e < n and e not in bounds and asc[e] in _ALNUM:
                continue
            if e + 1 < n and asc[e] == 46 and asc[e + 1] in _DIGITS:
                continue
            if _VERSION_CTX.search(text, _ctx_lo(text, s, 20), s):
                continue
            found.append(Found("ipv4", s, e, text[s:e]))

    def _ipv6(self, asc: bytes, found: list[Found], budget: Budget,
              bounds: frozenset[int]) -> None:
        n = len(asc)
        for m in spans(_IPV6, asc):
            if not budget.spend():
                return
            s, e = m[0]
            while e > s and asc[e - 1] == 46:  # trailing '.'
                e -= 1
            while s < e and asc[s] == 46:
                s += 1
            if e - s > 45 or e - s < 3:
                continue
            if s > 0 and asc[s - 1] in _ALNUM and s not in bounds:
                continue
            if e < n and asc[e] in _ALNUM and e not in bounds:
                continue
            cand = asc[s:e].decode()
            if cand.endswith(":") and not cand.endswith("::"):
                cand = cand[:-1]
                e -= 1
            try:
                addr = ipaddress.IPv6Address(cand)
            except ValueError:
                continue
            hexdigits = sum(c in "0123456789abcdefABCDEF" for c in cand)
            groups = [g for g in cand.split(":") if g]
            if hexdigits < 4 or not any(c.isdigit() for c in cand) or len(groups) < 2:
                continue
            found.append(Found("ipv6", s, e, addr.compressed))

    # -- cards, SSNs and phones share digit runs -----------------------------------------
    #
    # A run is digits joined by separators (space, - . / ( )), with an optional "+" in
    # front and an extension at the end. Groups are its digit strings; chunks are groups
    # joined without a space. Windows of consecutive chunks are tried left to right,
    # longest first: card, then SSN, then phone. A window spans at most a few chunks and
    # the run is paid for from the budget up front, so no run can cost more than its size.

    def _digit_runs(self, asc: bytes, text: str, found: list[Found], budget: Budget,
                    bounds: frozenset[int]) -> None:
        want_card = "card" in self.classes
        want_ssn = "ssn" in self.classes
        want_phone = self.phone is not None
        for m in spans(_RUN, asc):
            s, e = m[0]
            # Paid by its separators: each one may start a group, a chunk and a window.
            if not budget.spend(1 + len(asc[s:e].translate(None, b"0123456789"))):
                return
            s, e = _unglued(asc, s, e, bounds)
            glue = _glued(asc, s, e, bounds)
            # One chunk tagged onto a word ("INV-2024-0042", "v1.2.3456789") holds no
            # phone number; but a card in its groups tagged with a dash or an underscore
            # ("ref-4111-1111-1111-1111") is still a card. A bare number so tagged is an
            # id ("req-…", "fb_…"): one in ten passes Luhn and some brand's range.
            tagged = glue == 1 and 32 not in asc[s:e]
            if glue == 2 or (tagged and not ((want_card or want_ssn)
                                             and _dash_tagged(asc, s, e))):
                continue
            ext = _EXT_TAIL.search(asc, max(s, e - 12), e)
            ext_s = ext.start() if ext is not None else -1
            run = _Run(asc, text, s, ext_s if ext_s != -1 else e,
                       (ext_s, e) if ext_s != -1 else None, glue == 1)
            nch = len(run.ndig)
            if tagged:
                hit = self._card_at(run, 0) if want_card and nch == 1 and \
                    run.ngroups[0] > 1 else None
                # So is an SSN in its groups, where a word before names one ("ssn_…");
                # without, "PRJ-123-45-6789" is an id.
                if hit is None and want_ssn and nch == 1 and run.ngroups[0] == 3 and \
                        _SSN_CTX.search(text, _ctx_lo(text, s, 40), s):
                    hit = self._ssn_at(run, 0)
                if hit is not None:
                    found.append(hit[0])
                continue
            ndig, ngroups, first = run.ndig, run.ngroups, run.first_size
            # Tagged with a word, a number is an identifier's, unless a word before it
            # says it is a phone number ("phone: 020 7946 0958-home").
            phone_ok = want_phone and (not run.soft_glued or run.positive_context())
            a = 0
            free = 0  # first chunk not taken by a finding
            card_next = -1  # where a card starts that a phone number's window overlapped
            while a < nch:
                hit = None
                nd, ng = ndig[a], ngroups[a]
                # A card starts where a group of four does not run on into this one
                # ("1234 5678 9012 3456" holds no card starting at "5678"), but for a
                # year ("Paid on 15 March 2024 4111 1111 …"), and a card's groups joined
                # by dashes or dots stand apart ("2019 4111-1111-…").
                continued = (a > free and a != card_next and ngroups[a - 1] == 1
                             and ndig[a - 1] == 4 and ng == 1 and run.lead(a) == b" "
                             and not _YEAR.fullmatch(run.chunk_digits(a - 1)))
                if want_card and not continued and (
                        (ng == 1 and (12 <= nd <= 19 or nd == 4))
                        or (ng > 1 and first[a] == 4
                            and (12 <= nd <= 19 or nd == 4 * ng))):
                    hit = self._card_at(run, a)
                if hit is None and want_ssn and ((ng == 3 and nd == 9)
                                                 or (ng == 1 and nd in (3, 9))):
                    hit = self._ssn_at(run, a)
                if hit is None and phone_ok:
                    # In a list of numbers (a run of many chunks: readings, amounts, ids)
                    # neighbours would join into phone-shaped windows; there a phone is
                    # one chunk, or starts with '+' or '(', unless a word such as "tel" or
                    # "mobile" right before says the list is one of phone numbers. A run
                    # that repeats one layout ("030 1234 5678 030 1234 5679") is tried one
                    # number per period first.
                    span = 8 if (run.list_size(a) < _LIST_CHUNKS
                                 or run.lead(a)[-1:] in (b"+", b"(")
                                 or run.phone_list_context()) else 1
                    period = run.period()
                    if period and period < span:
                        hit = self._phone_at(run, a, budget, period)
                    if hit is None and not budget.exhausted:
                        hit = self._phone_at(run, a, budget, span)
                        if hit is not None and hit[1] < nch - 1:
                            hit = self._phone_then_next(run, a, budget, span, hit)
                    if budget.exhausted:
                        return
                    if hit is not None and want_card:
                        # A card that starts inside the phone number's window and runs
                        # past it wins, the phone number kept to the chunks before it:
                        # "Room 33 4111 1111 1111 1111" was a phone and two groups of
                        # the card.
                        card_next = next((c for c in range(a + 1, hit[1] + 1)
                                          if (card := self._card_at(run, c)) is not None
                                          and card[1] > hit[1]), -1)
                        if card_next != -1:
                            hit = self._phone_at(run, a, budget, card_next - a)
                if hit is None:
                    a += 1
                    continue
                found.append(hit[0])
                a = free = hit[1] + 1

    def _card_at(self, run: _Run, a: int):
        ndig, ngroups = run.ndig, run.ngroups
        if run.lead(a) == b"+":
            return None  # "+4915123455730" is a phone number
        if ngroups[a] > 1 and ndig[a] >= 12:
            # One chunk: groups joined by a single kind of separator ("4111-1111-...").
            if run.card_layout(a):
                digits = run.chunk_digits(a)
                if card_ok(digits):
                    return Found("card", run.chunk_start(a), run.chunk_end(a), digits), a
            if run.dashed_fours(a) != 4:
                return None
        # One bare group, or 4-digit groups separated by spaces ("4111 1111 ..."), some of
        # them joined by dashes ("4111 1111-1111 1111", as typed into a form).
        ends = []
        if ngroups[a] == 1 and 12 <= ndig[a] <= 19:
            ends.append(a)
        elif run.dashed_fours(a) == 4:
            total = ndig[a]
            b = a + 1
            while b < len(ndig) and run.lead(b) in _SPACED:
                last = run.dashed_fours(b)
                if not last:
                    break
                total += ndig[b]
                if total > 19:
                    break
                if total >= 12:
                    ends.append(b)
                if last != 4 and not (last == 6 and ngroups[b] == 1):
                    break  # only the last group may have another size
                b += 1
        for end in reversed(ends):
            digits = "".join(run.chunk_digits(c) for c in range(a, end + 1))
            if not card_ok(digits):
                continue
            if end == a and (run.soft_glued or (len(digits) <= 13 and a == 0
                                                and run.negative_context(_CARD_CTX))):
                continue
            return Found("card", run.chunk_start(a), run.chunk_end(end), digits), end
        return None

    @staticmethod
    def _sep_cards(asc: bytes, found: list[Found], budget: Budget,
                   bounds: frozenset[int]) -> None:
        """Cards whose groups a tab, a line break, a comma or an underscore joins, written
        alone: a further group on either side makes them part of a list or a larger
        number ("1234,4111,1111,1111,1111", "4111,1111,1111,1111.50")."""
        n = len(asc)
        for m in spans(_CARD_SEP_RX, asc):
            if not budget.spend():
                return
            s, e = m[0]
            sep = b"\r\n" if asc[s + 4] == 13 else asc[s + 4:s + 5]
            if s > 0 and s not in bounds:
                p = s - len(sep) if asc[s - len(sep):s] == sep else s
                if (asc[s - 1] in _ALNUM or asc[s - 1] == 43  # glued, or a '+' phone prefix
                        or (p > 0 and asc[p - 1] in _DIGITS)
                        or (p == s and s > 1 and asc[s - 1] in b".,-/:"
                            and asc[s - 2] in _DIGITS)):
                    continue
            if e < n and e not in bounds:
                p = e + len(sep) if asc[e:e + len(sep)] == sep else e
                if (asc[e] in _ALNUM or (p < n and asc[p] in _DIGITS)
                        or (p == e and e + 1 < n and asc[e] in b".,-/:"
                            and asc[e + 1] in _DIGITS)):
                    continue
            digits = asc[s:e].translate(None, b"\t\r\n,_").decode()
            if card_ok(digits):
                found.append(Found("card", s, e, digits))

    def _ssn_at(self, run: _Run, a: int):
        ndig, ngroups = run.ndig, run.ngroups
        if run.lead(a) == b"+":
            return None  # "+688 90 1234" is a phone number
        if ngroups[a] == 1 and ndig[a] == 9:
            gs = run.chunk_start(a)
            if not _SSN_CTX.search(run.text, _ctx_lo(run.text, gs, 40), gs):
                return None
            d = run.chunk_digits(a)
            if ssn_ok(d[:3], d[3:5], d[5:]):
                return Found("ssn", gs, run.chunk_end(a), d), a
            return None
        if ngroups[a] == 3:
            idx, end = list(range(run.cfirst[a], run.cfirst[a] + 3)), a
        elif (ngroups[a] == 1 and a + 2 < len(ndig) and ngroups[a + 1] == 1
              and ngroups[a + 2] == 1):
            idx, end = [run.cfirst[a], run.cfirst[a + 1], run.cfirst[a + 2]], a + 2
        else:
            return None
        if run.sizes(idx) != [3, 2, 4]:
            return None
        seps = run.seps(idx)
        if seps[0] != seps[1] or len(seps[0]) != 1 or seps[0] not in b" -./":
            return None
        parts = [run.group(k) for k in idx]
        if not ssn_ok(*parts):
            return None
        return Found("ssn", run.groups[idx[0]][0], run.groups[idx[-1]][1], "".join(parts)), end

    def _phone_then_next(self, run: _Run, a: int, budget: Budget, span: int, hit):
        """`hit` (the longest phone number at chunk `a`), or a shorter one there when the
        next number then reaches further: "030 1234 5678 / 0151 2345 6789" is two numbers,
        not "030 1234 5678 / 0151" and a tail left over."""
        shorter = self._phone_at(run, a, budget, min(span, hit[1] - a))
        if shorter is None:
            return hit
        after = self._phone_at(run, shorter[1] + 1, budget, span)
        if after is None or after[1] <= hit[1]:
            return hit
        # Take the shorter one only if the two numbers then cover more than the longest
        # one and whatever number follows it.
        after_hit = self._phone_at(run, hit[1] + 1, budget, span)
        reach = after_hit[1] if after_hit is not None else hit[1]
        return shorter if after[1] > reach else hit

    def _phone_at(self, run: _Run, a: int, budget: Budget, span: int):
        """The phone number starting at chunk `a`, of at most `span` chunks, if any."""
        ndig, nsingle = run.ndig, run.nsingle
        nch = len(ndig)
        total = singles = 0
        b = a
        # A '+' makes its chunk a phone number's ("+688-90-1234" is no SSN), and after the
        # country code "45-09-11" ends the number as its region writes it
        # ("+375 152 45-09-11"): without the '+' they are more likely an SSN or a date.
        plus = a == 0 and run.lead(0) == b"+"
        while b < nch and b - a < span and total + ndig[b] <= 15:
            if ((run.not_phone(b) and not (plus and (b == a or run.pairs(b))))
                    or (b == a and run.decimal(b))
                    or (b > a and run.lead(b) == b" / ")):  # " / " separates numbers
                break
            total += ndig[b]
            singles += nsingle[b]
            b += 1
        asc = run.asc
        for end in range(b - 1, a - 1, -1):
            if total < 7:
                return None
            count, window_singles = total, singles
            total -= ndig[end]
            singles -= nsingle[end]
            if window_singles > 2:
                continue
            start = run.chunk_start(a)
            # A leading '+' or '(' belongs to the number.
            while start > run.start and asc[start - 1] in b"+(":
                start -= 1
            digits = "".join(run.chunk_digits(c) for c in range(a, end + 1))
            bare = a == end and run.ngroups[a] == 1
            intl = asc[start] == 43 or (digits.startswith("00") and not
                                         digits.startswith("000"))
            if not intl and bare and count >= 11 and _INTL_CTX.search(
                    run.text, _ctx_lo(run.text, run.start, 40), run.start):
                intl = True  # an MSISDN: international, written without '+'

            if not intl:
                # After an identifier word the run is the identifier, as far as it runs
                # on in groups of four: "Tracking number 9400 1118 9922 3333 4444 55"
                # had its last groups masked. A number written otherwise after it is a
                # value of its own ("Order 4471 415-555-2671").
                if run.negative_context() and (a == 0 or all(
                        ndig[c] == 4 and run.ngroups[c] == 1 for c in range(a + 1))):
                    return None
                # Bare 10 or 13 digits starting with 1 are Unix times (s, ms) unless the
                # text says it is a phone number.
                if (bare and digits[0] == "1" and count in (10, 13)
                        and not run.positive_context()):
                    continue
                # A power of two or one off it is a limit ("0...2147483647").
                if bare and _power_of_two_or_next(int(digits)) \
                        and not run.positive_context():
                    continue
                # A ZIP+4 after a US state's code ("Boston, MA 02110-1301").
                if (a == end and ndig[a] == 9 and run.ngroups[a] == 2
                        and run.first_size[a] == 5 and not run.positive_context()
                        and _US_STATE_BEFORE.search(run.text, _ctx_lo(run.text, start, 6),
                                                    start)):
                    continue
            if not intl and run.money() and not run.positive_context():
                return None  # "612.345.678,00 EUR", "€ 612 345 678": money
            assert self.phone is not None
            value = self.phone.check(digits, intl, run.bounds(a, end) if not bare else (),
                                     budget)
            if (value is None and not intl and bare and count >= 10
                    and _PHONE_WORD_BEFORE.search(run.text, _ctx_lo(run.text, start, 40),
                                                  start)):
                # Right after a phone word (a `phone` key's number: "phone: 4420..."), a
                # run no region reads as its own is tried with its country code. Only
                # there: "outreach campaign 4930901820" is no phone number.
                value = self.phone.check(digits, True, (), budget)
            if value is None:
                if budget.exhausted:
                    return None
                continue
            stop = run.chunk_end(end)
            if run.ext is not None and end == nch - 1:
                stop = run.ext[1]
                # Another extension reaches another person: the value is another one,
                # with a placeholder of its own ("ext. 12" and "ext. 34" shared one).
                tail = asc[run.ext[0]:stop]
                value += "x" + tail[len(tail.rstrip(b"0123456789")):].decode()
            if asc[start] == 40 and 41 not in asc[start:stop]:
                # "(020 7946 0958)", "seed(912345678)": a bracket around the number, whose
                # ")" stays outside; taken alone it would leave the text unbalanced.
                start += 1
            if asc.count(b"(", start, stop) != asc.count(b")", start, stop):
                continue  # "94608000 (3 years)": a bracket that opens what follows
            return Found("phone", start, stop, value), end
        return None


# Chunks (space-separated numbers) from which a digit run reads as a list of numbers.
# Phone formats use up to 6 ("+33 1 23 45 67 89"), with an extension or a word of digits
# after it 7.
_LIST_CHUNKS = 8


class _Run:
    """One digit run, split into groups and chunks, with the per-chunk facts the card,
    SSN and phone checks need (digit strings and exclusions are computed on first use)."""

    __slots__ = ("_digits", "_lists", "_money", "_neg", "_not_phone", "_period", "_pos", "asc",
                 "cfirst", "ext", "first_size", "groups", "ndig", "ngroups", "nsingle",
                 "soft_glued", "start", "text")

    def __init__(self, asc: bytes, text: str, start: int, main_end: int,
                 ext: tuple[int, int] | None, soft_glued: bool):
        self.asc = asc
        self.text = text
        self.start = start
        self.ext = ext
        self.soft_glued = soft_glued
        groups = [g.span() for g in _GROUP.finditer(asc, start, main_end)]
        self.groups = groups
        cfirst = [0]
        for k in range(1, len(groups)):
            if 32 in asc[groups[k - 1][1]:groups[k][0]]:  # a space: a new chunk
                cfirst.append(k)
        self.cfirst = cfirst
        bounds = [*cfirst, len(groups)]
        sizes = [ge - gs for gs, ge in groups]
        self.ngroups = [bounds[c + 1] - bounds[c] for c in range(len(cfirst))]
        self.ndig = [sum(sizes[bounds[c]:bounds[c + 1]]) for c in range(len(cfirst))]
        self.nsingle = [sizes[bounds[c]:bounds[c + 1]].count(1) for c in range(len(cfirst))]
        self.first_size = [sizes[k] for k in cfirst]
        self._digits: dict[int, str] = {}
        self._not_phone: dict[int, bool] = {}
        self._neg: bool | None = None
        self._pos: bool | None = None
        self._money: bool | None = None
        self._period: int | None = None
        self._lists: list[int] | None = None

    def bounds(self, a: int, end: int) -> tuple[int, ...]:
        """Digit offsets where the groups of chunks a..end end, the last one excepted."""
        g = self.groups
        out = []
        total = 0
        for k in range(self.cfirst[a], self.cfirst[end] + self.ngroups[end] - 1):
            total += g[k][1] - g[k][0]
            out.append(total)
        return tuple(out)

    def _idx(self, c: int) -> range:
        return range(self.cfirst[c], self.cfirst[c] + self.ngroups[c])

    def group(self, k: int) -> str:
        gs, ge = self.groups[k]
        return self.asc[gs:ge].decode()

    def chunk_start(self, c: int) -> int:
        return self.groups[self.cfirst[c]][0]

    def chunk_end(self, c: int) -> int:
        return self.groups[self.cfirst[c] + self.ngroups[c] - 1][1]

    def chunk_digits(self, c: int) -> str:
        d = self._digits.get(c)
        if d is None:
            asc, groups = self.asc, self.groups
            d = self._digits[c] = b"".join(asc[groups[k][0]:groups[k][1]]
                                           for k in self._idx(c)).decode()
        return d

    def sizes(self, idx) -> list[int]:
        return [self.groups[k][1] - self.groups[k][0] for k in idx]

    def seps(self, idx) -> list[bytes]:
        g = self.groups
        idx = list(idx)
        return [self.asc[g[idx[k - 1]][1]:g[idx[k]][0]] for k in range(1, len(idx))]

    def lead(self, c: int) -> bytes:
        """The separator in front of chunk `c` (for the first, a leading '+' or '(')."""
        k = self.cfirst[c]
        gs = self.groups[k][0]
        return self.asc[self.start:gs] if k == 0 else self.asc[self.groups[k - 1][1]:gs]

    def card_layout(self, c: int) -> bool:
        """Groups of one chunk as a card is written: 4-4-4-4(-3), 4-6-5, 4-6-4 ..."""
        idx = self._idx(c)
        seps = self.seps(idx)
        if len(set(seps)) != 1 or len(seps[0]) != 1 or seps[0] not in (b"-", b".", b"/"):
            return False
        sizes = self.sizes(idx)
        return (sizes[0] == 4 and all(z in (4, 6) for z in sizes[1:-1])
                and 1 <= sizes[-1] <= 6)

    def dashed_fours(self, c: int) -> int:
        """The size of chunk `c`'s last group if its others are 4 digits each, joined
        by single dashes ("1111-1111", "4111", "10005"); else 0."""
        idx = self._idx(c)
        sizes = self.sizes(idx)
        if any(z != 4 for z in sizes[:-1]) or any(sep != b"-" for sep in self.seps(idx)):
            return 0
        return sizes[-1]

    def negative_context(self, positive: re.Pattern[str] | None = None) -> bool:
        """The run follows an identifier word ("Order No.", "tracking", "#") and no word
        saying it is this data class ("phone", "card" ...)."""
        if positive is None:
            if self._neg is None:
                self._neg = (_identifier_before(self.text, self.start)
                             and not self.positive_context())
            return self._neg
        return _identifier_before(self.text, self.start) and not positive.search(
            self.text, _ctx_lo(self.text, self.start, 40), self.start)

    def period(self) -> int:
        """The number of chunks after which the run's chunk sizes repeat, when they do
        over the whole run in periods of 2 to 6 that are not all one size (a list of
        numbers written alike, "415 555 2671 415 555 2672"); else 0."""
        if self._period is not None:
            return self._period
        sizes = self.ndig
        n = len(sizes)
        self._period = 0
        for p in range(2, 7):
            if (n % p == 0 and n > p and len(set(sizes[:p])) > 1
                    and all(sizes[i] == sizes[i - p] for i in range(p, n))):
                self._period = p
                break
        return self._period

    def list_size(self, c: int) -> int:
        """How many chunks the list around chunk `c` has: the run's, or, where ' / '
        separates numbers, those between the separators around `c`."""
        if self._lists is None:
            cuts = [k for k in range(1, len(self.ndig)) if self.lead(k) == b" / "]
            bounds = [0, *cuts, len(self.ndig)]
            self._lists = [hi - lo for lo, hi in pairwise(bounds) for _ in range(hi - lo)]
        return self._lists[c]

    def phone_list_context(self) -> bool:
        """A word naming phone numbers themselves ("Tel", "Mobile", "Phones:", "Contact:")
        just before the run; "call" is too common in prompts ("function call args")."""
        return bool(_PHONE_LIST_CTX.search(self.text, _ctx_lo(self.text, self.start, 16),
                                           self.start))

    def money(self) -> bool:
        """An amount: the run written as money is ("612.345.678", "17 027 431 638", one
        group), with a currency right before or after it ("$17 027 431 638", "612 345
        678,50 €"). No window of it is a phone number, its tail included; a phone number's
        grouping ("(02) 1234 9100,15 EUR", a CSV row's next field) is none."""
        if self._money is None:
            sizes = self.sizes(range(len(self.groups)))
            seps = set(self.seps(range(len(self.groups))))
            layout = len(sizes) == 1 or (sizes[0] <= 3 and all(z == 3 for z in sizes[1:])
                                         and len(seps) == 1 and seps <= {b".", b" "})
            end = self.ext[1] if self.ext else self.chunk_end(len(self.ndig) - 1)
            self._money = layout and bool(
                _AMOUNT_BEFORE.search(self.text, max(0, self.start - 6), self.start)
                or _AMOUNT_AFTER.match(self.text, end))
        return self._money

    def positive_context(self) -> bool:
        """A word saying the run is a phone number ("phone", "tel", "call") is just before."""
        if self._pos is None:
            self._pos = bool(_POS_CTX.search(
                self.text[_ctx_lo(self.text, self.start, 40):self.start].lower()))
        return self._pos

    def not_phone(self, c: int) -> bool:
        """Decimals, dates, IPv4 addresses and SSN-shaped chunks are not part of a phone
        number (unless a '+' says so: `_phone_at`)."""
        v = self._not_phone.get(c)
        if v is None:
            v = self._not_phone[c] = self._not_phone_chunk(c)
        return v

    def decimal(self, c: int) -> bool:
        """"40.099115", "0.75", "1299.99": a decimal number, which a phone number does not
        start with (unlike "030.1234567" or "96123.9263", groups joined by a dot, or
        "+247.40123", a country code and the number)."""
        if self.ngroups[c] != 2 or self.seps(self._idx(c))[0] != b".":
            return False
        k = self.cfirst[c]
        whole, frac = self.sizes((k, k + 1))
        # Only three-digit country codes (211 and up): "+49.243400" is as likely a
        # latitude, and no coordinate reaches 211.
        if (c == 0 and whole == 3 and self.lead(0) == b"+"
                and int(self.group(k)) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE):
            return False
        lead_zero = self.asc[self.groups[k][0]] == 48 and whole > 1
        return not lead_zero and (whole <= 3 or frac <= 2)

    def pairs(self, c: int) -> bool:
        """Is chunk `c` three groups of two digits ("45-09-11", "20.12.34")?"""
        return self.ngroups[c] == 3 and self.sizes(self._idx(c)) == [2, 2, 2]

    def _not_phone_chunk(self, c: int) -> bool:
        ng = self.ngroups[c]
        if ng not in (3, 4):
            return False
        chunk = self.asc[self.chunk_start(c):self.chunk_end(c)]
        if _DATE.fullmatch(chunk):
            return True
        if ng == 4 and _DOTTED4.fullmatch(chunk):
            return all(int(p) <= 255 for p in chunk.split(b"."))
        return ng == 3 and bool(_SSN_SHAPE.fullmatch(chunk))


_NEG_SET = frozenset(_NEG_WORDS.split("|"))
_NUMBERED_CODES = ("isbn", "ean", "upc", "gtin")
_NEG_FOLLOWERS = frozenset(("number", "no", "nr", "num", "id", "nummer", "numero", "n"))


# File extensions no top-level domain is: "jane@example.com.pdf" names a file after the
# address, which the provider needs whole to know the file's type.
_FILE_EXTENSIONS = frozenset((
    "pdf", "txt", "csv", "tsv", "doc", "docx", "xls", "xlsx", "ppt", "pptx", "odt", "rtf",
    "png", "jpg", "jpeg", "gif", "webp", "svg", "json", "xml", "html", "htm", "yaml", "yml",
    "eml", "msg", "vcf", "ics", "log", "bak", "tmp",
    # systemd units ("getty@tty1.service"): none is a top-level domain either.
    "service", "socket", "timer", "target", "mount", "slice", "scope"))


_SCALE = re.compile(r"[1-9][xX]")


def _past_the_domain(label: str, last: str) -> bool:
    """Is `last`, after the domain's `label`, no part of it: a file extension, or a word
    beginning a sentence without a space ("jane@example.com.Thanks")?"""
    if last.lower() in _FILE_EXTENSIONS:
        return True
    return (len(last) > 1 and last[0].isupper() and last[1:].islower()
            and label.islower())


def _ctx_lo(text: str, start: int, width: int) -> int:
    """Where the context read before `start` begins: `width` characters back, but never
    before the unit it is in (units are joined by NUL: a JSON key, a unit of its own, is
    no label for the value after it)."""
    lo = max(0, start - width)
    cut = text.rfind("\x00", lo, start)
    return lo if cut == -1 else cut + 1


def _identifier_before(text: str, start: int) -> bool:
    """Is `start` preceded by "#", or by an identifier word ("order", "invoice no.")?"""
    k = start
    lo = _ctx_lo(text, start, 28)
    while k > lo and not text[k - 1].isalnum():
        k -= 1
    if start - k > 6:
        return False
    if "#" in text[k:start]:
        return True
    e = k
    d = e
    while d > lo and text[d - 1].isdigit():
        d -= 1
    if 0 < e - d <= 2 and d > lo and text[d - 1] == "-" and \
            text[max(lo, d - 5):d - 1].lower().endswith(_NUMBERED_CODES):
        e = k = d - 1  # a numbered kind of code: "ISBN-10:", "EAN-13"
    while k > lo and text[k - 1].isalpha():
        k -= 1
    word = text[k:e].lower()
    if word in _NEG_SET:
        return True
    if word not in _NEG_FOLLOWERS:
        return False
    e = k
    while e > lo and k - e < 3 and not text[e - 1].isalnum():
        e -= 1
    k = e
    while k > lo and text[k - 1].isalpha():
        k -= 1
    return text[k:e].lower() in _NEG_SET


def _glued(asc: bytes, s: int, e: int, bounds: frozenset[int]) -> int:
    """2: the digit run is part of a word ("a1b2", "x@1"); 1: part of an identifier or of a
    larger number ("INV-2024-0042", "cc_4111…", "16:09:03.4999", "1,234,567"), which rules
    out a phone number and a bare card number; 0: free-standing. A part boundary
    (`bounds`) separates like a space."""
    kinds = (_glue_before(asc, s, bounds), _glue_after(asc, e, bounds))
    return 2 if _WORD in kinds else int(any(kinds))


# How a digit run's end is glued to what is beside it: not at all, to a word with a dash,
# a dot, a slash or an underscore ("INV-2024"), to another number (a time's ':', a
# thousands ','), or to a word directly ("a1", "2x").
_FREE, _TAGGED, _IN_NUMBER, _WORD = range(4)


def _glue_before(asc: bytes, s: int, bounds: frozenset[int]) -> int:
    if not (asc[s] in _DIGITS and s > 0 and s not in bounds):
        return _FREE
    prev = asc[s - 1]
    if (prev in _ALNUM and prev != 95) or prev == 64:
        return _WORD
    if s > 1 and prev in b"-_./" and asc[s - 2] in _ALNUM \
            and not asc.endswith(_WA_ME, 0, s) \
            and not _LABEL_DOT.search(asc, max(0, s - 9), s):
        return _TAGGED
    return _IN_NUMBER if prev in b":," and _inside_number(asc, s - 1) else _FREE


def _glue_after(asc: bytes, e: int, bounds: frozenset[int]) -> int:
    n = len(asc)
    if not (e < n and e not in bounds):
        return _FREE
    nxt = asc[e]
    if (nxt in _ALNUM and nxt != 95) or nxt == 64:
        return _WORD
    if e + 1 < n and nxt in b"-_./" and asc[e + 1] in _ALNUM \
            and not _SENTENCE_NEXT.match(asc, e):
        return _TAGGED
    return _IN_NUMBER if e + 1 < n and nxt in b":," and _inside_number(asc, e) else _FREE


def _unglued(asc: bytes, s: int, e: int, bounds: frozenset[int]) -> tuple[int, int]:
    """The run s..e without an end group that is part of another number (a time's, one
    with thousands separators), or a last group that starts a word, where a space parts
    it from the rest: "…1111 2x charged", "… 2671 9am", "10:30:00 415-555-2671 00:02:31".
    Taken with it, the whole run was no value; so is a first group tagged with a word by
    a dash, a slash or an underscore ("JIRA-1234 415-555-2671"), but for a card's own
    ("ref-4111 1111 1111 1111"). (A first group glued to a word is the run's prefix,
    "CHF28 603 650 817".)"""
    before = _glue_before(asc, s, bounds)
    if before == _IN_NUMBER or (before == _TAGGED and not _card_groups_from(asc, s, e)):
        cut = asc.find(b" ", s, e)
        if cut != -1:
            rest = e - len(asc[cut:e].lstrip(b" "))
            if asc[rest] in _RUN_HEADS and _enough_digits(asc, rest, e):
                s = rest
    if _glue_after(asc, e, bounds) in (_WORD, _IN_NUMBER):
        cut = asc.rfind(b" ", s, e)
        if cut != -1:
            rest = s + len(asc[s:cut].rstrip(b" "))
            if rest > s and asc[rest - 1] in _RUN_TAILS and _enough_digits(asc, s, rest):
                e = rest
    return s, e


_CARD_START = re.compile(rb"[0-9]{4} (?:[0-9]{4}|[0-9]{6})(?![0-9])")


def _card_groups_from(asc: bytes, s: int, e: int) -> bool:
    """Does the run at s start as a card's groups do: four digits, a space, then four
    (or six, Amex's layout)?"""
    return _CARD_START.match(asc, s, e) is not None


_RUN_HEADS = frozenset(b"0123456789+(")
_RUN_TAILS = frozenset(b"0123456789)")


def _enough_digits(asc: bytes, s: int, e: int) -> bool:
    """As many digits as a run holds at least (_RUN)."""
    return e - s - len(asc[s:e].translate(None, b"0123456789")) >= 7


_YEAR = re.compile(r"19[0-9]{2}|20[0-9]{2}")
# A label and its full stop ("Tel.415-555-0132"), and a full stop that starts a sentence
# typed without a space ("…555 0132.Thanks"): neither ties the number to a word.
_LABEL_DOT = re.compile(rb"(?i)\b(?:tel|ph|phone|fax|mob|mobile|cell|ssn|card|no|nr)\.$")
_SENTENCE_NEXT = re.compile(rb"\.[A-Z][a-z]")


def _dash_tagged(asc: bytes, s: int, e: int) -> bool:
    """Is the digit run s..e bound to its neighbours by dashes or underscores only? A dot,
    a slash, a colon or a comma between it and a word or number makes it part of a
    version, a path, a time or a list."""
    if s > 1 and asc[s - 1] in b"./:," and asc[s - 2] in _ALNUM:
        return False
    return not (e + 1 < len(asc) and asc[e] in b"./:," and asc[e + 1] in _ALNUM)


def _inside_number(asc: bytes, p: int) -> bool:
    """Is the ',' or ':' at `p` a thousands separator ("1,234,567.89": 1-3 digits before,
    exactly 3 after) or a time's ("16:09:03": 1-2 digits before, exactly 2 after)? Not
    when the group after a ',' runs on into another group ("17,123-45-6789"): a CSV field
    then, like "1001,4111111111111111"."""
    size = 3 if asc[p] == 44 else 2
    k = p
    while k > 0 and p - k <= size and asc[k - 1] in _DIGITS:
        k -= 1
    if not 1 <= p - k <= size:
        return False
    n = len(asc)
    m = p + 1
    while m < n and m - p <= size + 1 and asc[m] in _DIGITS:
        m += 1
    if m - p - 1 != size:
        return False
    return size == 2 or m == n or asc[m] not in b"-/()"


_KEY_SEGMENT = re.compile(r"[-_]")
_WORD_NUMBER = re.compile(r"[a-z]{1,8}[0-9]{1,6}|[a-z][0-9]{1,2}[a-z]")


def _power_of_two_or_next(n: int) -> bool:
    """2**k, 2**k - 1 or 2**k + 1: the limits code writes (2147483647, 4294967296)."""
    return n > 0 and (n & (n - 1) == 0 or n & (n + 1) == 0 or (n - 1) & (n - 2) == 0)


# A key's prefix, before its random part: "glpat-", "npm_", "SG.", "123456789:AA".
_KEY_PREFIX = re.compile(r"^(?:[A-Za-z0-9]+(?:_v1|_api|_live|_test)?[-_.]|[0-9]+:AA)")


def _random_part(body: str) -> bool:
    """A key's random part, not a name that took a key's prefix
    ("npm_config_strict_peer_dependencies", "glpat-contribution-guidelines",
    "r8_SomeLongCamelCaseName"): letters and digits mixed, or 40 or more of mixed case
    that are no words joined by dashes or underscores."""
    pieces = _KEY_SEGMENT.split(body)
    if all(map(_wordlike, pieces)) or _wordy(body):
        return False
    has_digit = any(c.isdigit() for c in body)
    has_alpha = any(c.isalpha() for c in body)
    mixed = any(c.isupper() for c in body) and any(c.islower() for c in body)
    return (has_digit and has_alpha) or (len(body) >= 40 and mixed)


_WORD_RUN = re.compile(r"[A-Z]?[a-z]{3,}")


def _wordy(text: str) -> bool:
    """Mostly words of three letters or more, run together as code names them
    ("OAuth2AccessToken", "create_access_token_v2"): in 16 random letters and digits, as
    much falls in such runs less than once in a hundred."""
    # (Only where case changes or separators mark words: lower-case letters and digits,
    # as many keys are, run long by chance.)
    if text.islower() and not _KEY_SEGMENT.search(text):
        return False
    return sum(map(len, _WORD_RUN.findall(text))) >= 0.7 * len(text)


def _wordlike(segment: str) -> bool:
    """A piece of a name, not of a random key: a short lowercase word, a year or version
    number, two characters, a word with a number after it ("nistp256", "ed25519",
    "v01") or a numeronym ("k8s", "i18n"). A key's random part is one long piece, or
    letters and digits mixed ("4f9a2b1c", "cefb2arp")."""
    return ((segment.isalpha() and segment.islower() and len(segment) <= 12)
            or (segment.isdigit() and len(segment) <= 4) or len(segment) <= 2
            or _WORD_NUMBER.fullmatch(segment) is not None)


# A key's stand-in in docs and examples: a run of x's ("ghp_xxxx…", "AKIAXXXX…",
# Slack's "T00000000/B00000000/XXXX…") or AWS's own EXAMPLE keys. (Eight of a letter in
# a row fall in a real key's random part less than once in 10^5; other runs are real: an
# AWS session token's "//////////".)
_STAND_IN = re.compile(r"([xX])\1{7}|EXAMPLE")
_TOKEN_CLASSES = frozenset({"api_key", "github_token", "slack_token", "cloud_key"})


def _secret_ok(cls: str, value: str, check: str = "") -> bool:
    """Whether a match is the secret it looks like; `check`: "named" where found by its
    name alone (_NAMED_ONLY), where letters and digits must mix; "basic" for base64 that
    must hold `user:password` (_BASIC_AUTH)."""
    if cls in _TOKEN_CLASSES and _STAND_IN.search(value):
        return False
    if cls == "slack_token" and value.startswith("xox"):
        return _random_part(_KEY_PREFIX.sub("", value, count=1))  # not "xoxb-your-token"
    if cls == "jwt":
        head = value.split(".", 1)[0]
        try:
            raw = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
            obj = json.loads(raw)
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return False
        return isinstance(obj, dict) and ("alg" in obj or "typ" in obj or "enc" in obj)
    if cls == "api_key" and value[:3] in ("sk-", "rk-"):
        body = value[3:]
        pieces = _KEY_SEGMENT.split(body)
        if all(map(_wordlike, pieces)) and any(p.isalpha() and len(p) >= 3 for p in pieces):
            return False  # a kebab-case name, a word in it: "sk-learn-upgrade-pipeline-2024"
        has_digit = any(c.isdigit() for c in body)
        has_alpha = any(c.isalpha() for c in body)
        mixed = any(c.isupper() for c in body) and any(c.islower() for c in body)
        return (has_digit and has_alpha) or (len(body) >= 40 and mixed)
    if check == "basic":
        return _basic_credential(value)
    if check == "named":
        return any(c.isdigit() for c in value) and any(c.isalpha() for c in value) and \
            _random_part(value)
    if (cls == "api_key" and value[:3] not in ("sk-", "rk-")) or (
            cls == "cloud_key" and value.startswith(("GOCSPX-", "ya29."))):
        return _random_part(_KEY_PREFIX.sub("", value, count=1))
    if cls == "cloud_key" and value.startswith(_AWS_PREFIXES):
        return len(value) == 20
    if cls == "password":
        return _password_like(value)
    return True


# What a password field holds when it holds none: a template's slot, a mask, one word
# or name shorter than 12 letters ("password: required", "username:password:base_dn"),
# a time or size (a build's `first_pass: 2.3s`).
_NO_PASSWORD = re.compile(r"\{\{[^}]*\}\}|%\(\w+\)s|[*x•.]+|[a-z_\-]{1,11}"
                          r"|[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d|[kmgt]i?b|%)", re.IGNORECASE)


def _basic_credential(value: str) -> bool:
    """Base64 of `user:password` with a password that is no slot or mask (the docs'
    `user:pass`): not "Basic settings1" in prose."""
    try:
        text = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, ValueError):
        return False
    _, colon, password = text.partition(":")
    return bool(colon and password) and text.isprintable() and \
        _NO_PASSWORD.fullmatch(password) is None


# Code's value: `process.env.DB_PASSWORD`, `self._options`, `typing.Optional`.
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


def _password_like(value: str) -> bool:
    """A value a password is: letters and digits both (code's names, labels, slots and
    masks seldom hold a digit: `hashedPassword`, `new_password`, `<password>`,
    `Passwort*`), and no name in code (`config.db2.password`, `user2_password`), path,
    address (nginx's `proxy_pass: "http://…"`; a URL's own password is found in it),
    variable, template's slot or mask. A password of letters only is let go."""
    return (len(value) >= 4 and value[0] not in "$!?<"
            and not value.startswith(("/", "./", "../", "~/"))
            and "://" not in value
            and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
            and _DOTTED_NAME.fullmatch(value) is None
            and _NO_PASSWORD.fullmatch(value) is None
            and not (_KEY_SEGMENT.search(value)
                     and all(map(_wordlike, _KEY_SEGMENT.split(value)))))


def _secret_matches(data: bytes, asc: bytes, classes: list[str], budget: Budget,
                    bounds: frozenset[int], gaps: list[tuple[int, int, int]] = ()):
    """(class, start, end, found by a name alone) of each match of the classes' patterns
    in `data`, which is `asc` with the `gaps` taken out; offsets are `asc`'s, and so are
    the neighbours a match must not run on into."""
    at = [b - removed for _, b, removed in gaps]  # where each gap was, in `data`
    n = len(asc)
    sql = None
    for cls in classes:
        for rx in _SECRETS[cls]:
            if rx in _IDENTIFIED_ONLY:
                if sql is None:
                    sql = b"dentified" in data or b"DENTIFIED" in data
                if not sql:
                    continue
            has_v = rx.groups > 0
            for m in spans(rx, data):
                if not budget.spend(4):
                    return
                s, e = m[1] if has_v else m[0]
                if gaps:
                    k = bisect_right(at, s) - 1
                    s += gaps[k][2] if k >= 0 else 0
                    k = bisect_right(at, e - 1) - 1
                    e += gaps[k][2] if k >= 0 else 0
                # An underscore ends an identifier's word as a space does: "x_sk-proj-…"
                # holds a key, "task-…" does not.
                if (s > 0 and asc[s - 1] in _ALNUM and asc[s - 1] != 95 and not has_v
                        and s not in bounds):
                    continue
                if has_v and e < n and asc[e] in _ALNUM and e not in bounds:
                    continue
                yield cls, s, e, ("named" if rx in _NAMED_ONLY else
                                  "basic" if rx in _BASIC_AUTH else "")


# Characters on both sides of a soft space (NBSP ...) that make it part of a token.
_TOKEN_EDGE = _ALNUM | frozenset(b"-+/=")


def _token_gaps(asc: bytes, soft: list[tuple[int, int]],
                budget: Budget) -> list[tuple[int, int, int]]:
    """The runs of soft spaces between two token characters, each as (start, end, how many
    characters the runs up to and including it hold)."""
    if not soft or not budget.spend(1 + len(soft) // 2):
        return []
    gaps: list[tuple[int, int, int]] = []
    removed = 0
    for a, b in soft:
        if a > 0 and b < len(asc) and asc[a - 1] in _TOKEN_EDGE and asc[b] in _TOKEN_EDGE:
            removed += b - a
            gaps.append((a, b, removed))
    return gaps


def _kept(gaps: list[tuple[int, int, int]], start: int, end: int):
    """The pieces of start..end outside the gaps, as (start, end)."""
    pos = start
    for k in range(bisect_right(gaps, (start,)), len(gaps)):
        a, b, _ = gaps[k]
        if a >= end:
            break
        yield pos, a
        pos = b
    if pos < end:
        yield pos, end
