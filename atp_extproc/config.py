"""atp.yaml → a validated, immutable snapshot.

Every error names the file, the path inside it and the reason, so a bad reload can be
fixed from the log line alone. Validation is split in two: pydantic checks shapes and
ranges; `_check_references` checks what pydantic cannot see (names that must exist).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import re
import sqlite3
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from atp_extproc.llm_api import OPERATIONS
from atp_extproc.policy.attributes import CandidateInfo
from atp_extproc.policy.engine import PolicySet
from atp_extproc.policy.runtime import policy_set_from_config
from atp_extproc.policy.settings import (
    NOT_REGULAR,
    KeyCheckingLoader,
    LineDict,
    LineList,
    PolicyError,
    directory_of,
    error_line,
    load_file,
    load_yaml,
    located,
    read_regular,
)
from atp_extproc.redact import BUILTIN_CLASSES, RedactionSettings, Redactor
from atp_extproc.routing.selection import CandidateModel
from atp_extproc.routing.settings import (
    TOKEN_PATTERN,
    LedgerSettings,
    RouteObjective,
    check_references,
)
from atp_extproc.settings_types import Flag, Frozen, Items, problem_reason
from atp_extproc.store import sqlite as ledger_db
from atp_extproc.store.money import to_decimal, whole_pico_per_token

# Envoy cluster names and model ids are copied into headers: keep them to a safe alphabet.
TOKEN = re.compile(TOKEN_PATTERN)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ConfigError(Exception):
    """One or more problems in a config file, each with file, path and reason."""

    def __init__(self, file: str, problems: list[tuple[str, str]],
                 lines: list[int] | None = None):
        """`lines`: each problem's line in `file` (0: unknown), where known."""
        self.file = file
        self.problems = problems
        self.lines = lines or [0] * len(problems)
        text = [f"{file}: {path or '<root>'}: {reason}" + (f" (line {n})" if n else "")
                for (path, reason), n in zip(problems, self.lines, strict=True)]
        super().__init__("\n".join(text))


Token = Annotated[str, Field(pattern=TOKEN.pattern)]
# A token, or a cluster Istio named: `outbound|443||api.openai.com` (its ServiceEntry's
# port and host), which the shipped EnvoyFilter routes to as ATP says.
ClusterName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@|-]{0,127}$")]


# USD per 1K tokens. Far above any real price; bounded so that a typo (a price per
# million, an extra zero or ten) is refused, and a price stays within the ledger's 64-bit
# picodollars per token (1e12 at this one). A request's cost can pass 64 bits (10^9 tokens
# at this price are 1e21 pico): the ledger writes such a row's sums as SQLite REALs.
MAX_PRICE_PER_1K = 1000.0


class Price(Frozen):
    input_per_1k: float = Field(ge=0, le=MAX_PRICE_PER_1K, allow_inf_nan=False)
    output_per_1k: float = Field(ge=0, le=MAX_PRICE_PER_1K, allow_inf_nan=False)

    @field_validator("input_per_1k", "output_per_1k")
    @classmethod
    def _exact_in_the_ledger(cls, price: float) -> float:
        # The ledger counts whole picodollars per token (store/money.py).
        if not whole_pico_per_token(to_decimal(price)):
            raise ValueError(f"{price!r} has more than 9 decimal places; the ledger "
                             "counts whole picodollars per token and would round it")
        return price


# The shipped Envoy configs' own clusters: ATP itself (atp_ext_proc in Istio) and the
# shadow listener. A model routed to one would send live traffic, x-atp-* headers and
# all, back into Envoy or ATP.
RESERVED_CLUSTERS = frozenset({"atp", "atp_ext_proc", "atp_shadow"})
_ISTIO_OWN_CLUSTERS = frozenset({"PassthroughCluster", "BlackHoleCluster",
                                 "InboundPassthroughCluster",
                                 "InboundPassthroughClusterIpv4",
                                 "InboundPassthroughClusterIpv6"})


class Model(Frozen):
    name: Token
    cluster: ClusterName
    upstream_model: Token
    price: Price
    region: str = "unspecified"
    egress: Literal["internal", "external"] = "external"

    @field_validator("cluster")
    @classmethod
    def _a_model_cluster(cls, cluster: str) -> str:
        if cluster in RESERVED_CLUSTERS:
            raise ValueError(f"{cluster!r} is an Envoy cluster of ATP's own, not a model's")
        if cluster.startswith("inbound|") or cluster in _ISTIO_OWN_CLUSTERS:
            raise ValueError(f"{cluster!r} is a cluster of Istio's own, not a model's: it "
                             "leads back into the pod, or wherever the request's Host "
                             "says, not to one provider")
        return cluster


class RouteMatch(Frozen):
    # Empty means "any": a route with no match block serves every operation and tenant.
    paths: Items[str] = ()
    # Tenant ids as they are written anywhere else: one with a space or a typo'd
    # character could never match, and the route would stop serving without a word.
    tenants: Items[Token] = ()

    @field_validator("paths")
    @classmethod
    def _known_paths(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            if path not in OPERATIONS:
                raise ValueError(f"unknown API path {path!r}; known: {sorted(OPERATIONS)}")
        return paths


class Route(Frozen):
    name: Token
    match: RouteMatch = RouteMatch()
    aliases: dict[Token, Items[Token]] = Field(min_length=1)
    default: Token | None = None
    # Learned choice among an alias's candidates; without it the first candidate serves.
    objective: RouteObjective | None = None
    # Put the client's own values back in place of placeholders in the response
    # (None: redaction.restore).
    restore: Flag | None = None

    @field_validator("aliases")
    @classmethod
    def _non_empty_candidates(
        cls, aliases: dict[str, tuple[str, ...]]
    ) -> Mapping[str, tuple[str, ...]]:
        for alias, candidates in aliases.items():
            if not candidates:
                raise ValueError(f"alias {alias!r} has no candidate models")
        return MappingProxyType(aliases)


class ApiKey(Frozen):
    key_id: Token
    tenant: Token
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.lower()
        if not _SHA256.fullmatch(value):
            raise ValueError("must be the lowercase hex SHA-256 of the key (64 hex digits)")
        return value


class Jwt(Frozen):
    metadata_namespace: str = "envoy.filters.http.jwt_authn"
    payload_key: str = "jwt_payload"
    tenant_claim: str = "tenant"

    @field_validator("metadata_namespace", "payload_key", "tenant_claim")
    @classmethod
    def _a_name(cls, name: str) -> str:
        # An empty or padded name matches nothing jwt_authn writes: no token could ever
        # name a tenant, and every caller with one would get a 401 about a '' claim.
        if not name.strip() or name != name.strip():
            raise ValueError(f"{name!r} names nothing jwt_authn writes: give the name, "
                             "without surrounding spaces")
        return name


class Auth(Frozen):
    api_keys: Items[ApiKey] = ()
    jwt: Jwt | None = None
    # Only set this when the hop in front of Envoy authenticates callers and sets the
    # header itself; otherwise any client could claim any tenant.
    trusted_tenant_header: str | None = None
    anonymous_tenant: Token | None = None

    @field_validator("trusted_tenant_header")
    @classmethod
    def _lowercase_header(cls, name: str | None) -> str | None:
        if name is None:
            return None
        # Envoy hands header names to ATP in lower case.
        name = name.lower()
        problem = _tenant_header_problem(name)
        if problem is not None:
            raise ValueError(f"{name!r} can never name the tenant: {problem}")
        return name


# RFC 9110's token: the characters an HTTP field name may hold.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
# Every header clients put API keys in (OpenAI, Azure OpenAI, Anthropic-style): ATP reads
# them and removes them before a request leaves.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")


def _tenant_header_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if name.startswith(":"):
        return "it is an HTTP/2 pseudo-header (like :path), which no hop sets as a header"
    if name == "host":
        return "Envoy hands the Host header to ATP as :authority, which no hop sets for a tenant"
    if not _HEADER_NAME.fullmatch(name):
        return "it is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
    if name.startswith(("x-atp-", "x-envoy-")):
        return (f"Envoy removes every {name[:name.index('-', 2) + 1]}* header a request "
                "brings before ATP sees it")
    if name in CREDENTIAL_HEADERS:
        return "it carries the caller's credential, which ATP reads as an API key"
    if name in _HTTP_OWN_HEADERS:
        return ("HTTP or Envoy sets it for every request (its framing, its id, where it "
                "came from and for which host): no hop in front can name a tenant in it")
    if name in _TRACE_HEADERS or name.startswith("x-b3-"):
        return ("it carries a trace context, which the caller's tracer or each hop's sets "
                "per request: no hop in front can name a tenant in it")
    return None


# x-request-id read as the tenant made each keyless caller a tenant of its own.
_HTTP_OWN_HEADERS = frozenset((
    "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-port",
    "content-length", "content-type", "content-encoding", "transfer-encoding", "connection",
    "te", "upgrade", "keep-alive", "proxy-connection", "expect", "accept-encoding",
    # Each proxy on the way adds itself, or the client's Host or certificate, to these.
    "forwarded", "via", "x-forwarded-host", "x-forwarded-client-cert"))
# W3C, Zipkin (x-b3-* too), OpenTracing, Google Cloud, AWS X-Ray and Datadog.
_TRACE_HEADERS = frozenset((
    "traceparent", "tracestate", "baggage", "b3", "x-ot-span-context",
    "x-cloud-trace-context", "grpc-trace-bin", "x-amzn-trace-id", "x-datadog-trace-id",
    "x-datadog-parent-id"))


# A host name or IPv4 address (an IPv6 address goes in brackets).
_HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*")
# Linux's sun_path holds 108 bytes, the terminating NUL included.
MAX_UNIX_PATH_BYTES = 107


def _tcp_listen_problem(listen: str) -> str | None:
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", listen)
    if scheme:
        return (f"takes no scheme ({scheme.group()}): give host:port, [IPv6]:port or "
                "unix:/path/to.sock")
    host, colon, port = listen.rpartition(":")
    if not colon:
        return "give host:port, [IPv6]:port or unix:/path/to.sock"
    if listen.startswith("[") and listen.endswith("]"):
        return f"no port after the IPv6 address: give {listen}:PORT (e.g. [::1]:50051)"
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        return f"the port {port!r} is not a number from 1 to 65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not an IPv6 address"
        return None
    if not host:
        # gRPC refuses ':50051'; "every interface" must be said.
        return "no host before the port (0.0.0.0 or [::] for every interface)"
    if ":" in host:
        return "an IPv6 address goes in brackets, e.g. [::1]:50051"
    if not _HOST.fullmatch(host):
        return f"{host!r} is not a host name or IP address"
    return None


def _unix_listen_problem(listen: str) -> str | None:
    path = unix_socket_path(listen) or ""
    # gRPC binds unix://tmp/x.sock at /tmp/x.sock: only unix:///abs is unambiguous.
    if listen.startswith("unix://") and not path.startswith("/"):
        return "unix:// takes an absolute path (unix:///run/atp.sock or unix:/run/atp.sock)"
    if not path:
        return "no socket path after unix:"
    if "\0" in path:
        return "a socket path cannot hold a NUL character"
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        return (f"the socket path is {len(path.encode())} bytes long; a Unix socket path "
                f"holds at most {MAX_UNIX_PATH_BYTES}")
    return None


def unix_socket_path(listen: str) -> str | None:
    """The socket file a unix: address names (None: a TCP address)."""
    if not listen.startswith("unix:"):
        return None
    path = listen.removeprefix("unix:")
    return path[2:] if path.startswith("//") else path  # unix:///abs is /abs


def unix_socket_problem(path: str) -> str | None:
    """What keeps gRPC from making its socket at `path` that the file system shows
    without making one (None: nothing seen; a socket there may still be in use)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        # gRPC makes no directory.
        directory = os.path.dirname(path) or "."
        return None if os.path.isdir(directory) else f"the directory {directory} does not exist"
    except PermissionError:
        return None  # check may run as another user than serve, which binding tells
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if stat.S_ISSOCK(mode) else f"{path} exists and is not a socket"


# SQLite's answers to a reader that may not read the file (or, in a read-only directory,
# make its -shm beside it): serve's to tell, as it may run as another user.
_NOT_OURS_TO_READ = frozenset({sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN,
                               sqlite3.SQLITE_READONLY_DIRECTORY, sqlite3.SQLITE_BUSY,
                               sqlite3.SQLITE_LOCKED})


def _ledger_problem(path: Path) -> str | None:
    """Why the ledger's writer could not open `path`, as far as the file system shows
    without making anything (None: nothing seen). The writer makes missing directories,
    below the nearest one there is; a file there instead is in the way. Permissions are
    left to serve: check may run as another user."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # serve's mkdir or open fails on it
            return f"cannot open the ledger {path}: its links lead round in a loop"
    if os.path.exists(path):  # (a directory is refused by parse)
        if not os.path.isfile(path):
            # /dev/null opened as an empty database and serve then failed to write it.
            return f"cannot open the ledger {path}: not a regular file (a device or a pipe)"
        if _read_only(path):
            return f"cannot open the ledger {path}: it is on a read-only file system"
        try:
            ledger_db.connect(path, readonly=True).close()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) in _NOT_OURS_TO_READ:
                return None  # check may run as another user, or beside a ledger in use
            # Not a database, another program's or another schema version's.
            return f"cannot open the ledger {path}: {exc}"
        except OSError:
            return None
        return None
    # Where links lead, as the writer makes them there (a link to a directory not made).
    for directory in Path(os.path.realpath(path)).parents:
        try:
            mode = os.stat(directory).st_mode
        except OSError:
            continue  # missing, below a file, or not ours to see: look higher
        if not stat.S_ISDIR(mode):
            return f"cannot open the ledger {path}: {directory} is not a directory"
        if _read_only(directory):
            return (f"cannot open the ledger {path}: {directory} is on a read-only file "
                    "system")
        return None
    return None


def _is_dir(path: str) -> bool:
    """Path.is_dir(), False where the path cannot be looked up (serve's start names why)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _read_only(path: str | Path) -> bool:
    """A read-only mount, which no permission of any user's makes writable."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# The body buffer limit of the shipped Envoy configs (envoy/*.yaml,
# per_connection_buffer_limit_bytes): Envoy sends ATP bodies up to it, whatever ATP's own
# max_body_bytes says.
ENVOY_BUFFER_LIMIT_BYTES = 8 * 1024 * 1024


def envoy_buffer_limit(max_body_bytes: int) -> int:
    """Envoy's body buffer: the shipped limit, or twice max_body_bytes when that is
    raised (README: Envoy buffers twice what ATP accepts); lowering max_body_bytes alone
    leaves Envoy's limit where it was."""
    return max(2 * max_body_bytes, ENVOY_BUFFER_LIMIT_BYTES)


class Server(Frozen):
    listen: str = "127.0.0.1:50051"
    grace_period_s: float = Field(default=10.0, ge=0, le=600)
    # Beside other ATP endpoints, Envoy keeps sending new exchanges until its health
    # checks see NOT_SERVING: refused meanwhile, they would fail (fail-closed).
    drain_delay_s: float = Field(default=0.0, ge=0, le=600)
    # Must stay below Envoy's buffer limit (envoy/front-proxy.yaml) so ATP, not Envoy,
    # answers oversize bodies; tests check the two files agree.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_json_depth: int = Field(default=64, ge=2, le=512)
    # Checked before any per-item work, so a body of 100k tiny messages costs little.
    max_messages: int = Field(default=2048, ge=1, le=1_000_000)
    max_tools: int = Field(default=256, ge=0, le=100_000)
    # A poll is a stat of every file the config reads: more often than this only burns
    # a core (1e-9 kept an idle ATP at 100%).
    reload_poll_s: float = Field(default=1.0, ge=0.05, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("listen")
    @classmethod
    def _bindable(cls, listen: str) -> str:
        # Checked here, not at bind time: `check` and a reload must refuse it too.
        problem = (_unix_listen_problem(listen) if listen.startswith("unix:")
                   else _tcp_listen_problem(listen))
        if problem is not None:
            raise ValueError(f"{listen!r}: {problem}")
        return listen


class _Document(Frozen):
    server: Server = Server()
    auth: Auth = Auth()
    models: Items[Model] = Field(min_length=1)
    routes: Items[Route] = Field(min_length=1)
    ledger: LedgerSettings = LedgerSettings()
    redaction: RedactionSettings = RedactionSettings()
    # Checked, with file and line numbers, by atp_extproc.policy (see _policies).
    # Any: their shape is the loader's to report too, with the line; pydantic's would
    # name it a second time.
    policy: Any = None
    policies: Any = None


@dataclass(frozen=True)
class Snapshot:
    """The config in force; replaced whole on reload, never mutated."""

    source: str
    version: str
    server: Server
    auth: Auth
    models: Mapping[str, Model]
    routes: tuple[Route, ...]
    api_keys: Mapping[str, ApiKey] = field(repr=False)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    # (route, alias) → candidates, built once: the router prepares per candidates object.
    candidates: Mapping[tuple[str, str], tuple[CandidateModel, ...]] = field(
        default_factory=dict, repr=False)
    policies: PolicySet | None = field(default=None, repr=False)
    # (route, alias) → the same candidates as the policy engine's resources.
    policy_candidates: Mapping[tuple[str, str], tuple[CandidateInfo, ...]] = field(
        default_factory=dict, repr=False)
    # Files whose change means a reload: atp.yaml and the policy files it includes.
    files: tuple[str, ...] = ()
    # policy.include as absolute globs (the loader's): a file that starts matching one is
    # a reload too.
    include_globs: tuple[str, ...] = ()
    redactor: Redactor | None = field(default=None, repr=False)

    def routes_for(self, path: str, tenant: str) -> list[Route]:
        return [
            r
            for r in self.routes
            if (not r.match.paths or path in r.match.paths)
            and (not r.match.tenants or tenant in r.match.tenants)
        ]

    def aliases_for(self, tenant: str) -> list[str]:
        seen: dict[str, None] = {}
        for route in self.routes_for_tenant(tenant):
            seen.update(dict.fromkeys(route.aliases))
        return list(seen)

    def routes_for_tenant(self, tenant: str) -> list[Route]:
        return [r for r in self.routes if not r.match.tenants or tenant in r.match.tenants]


def _check_references(doc: _Document) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    names = [m.name for m in doc.models]
    for i, name in enumerate(names):
        if names.index(name) != i:
            problems.append((f"models[{i}].name", f"duplicate model name {name!r}"))
    route_names = [r.name for r in doc.routes]
    for i, route in enumerate(doc.routes):
        if route_names.index(route.name) != i:
            problems.append((f"routes[{i}].name", f"duplicate route name {route.name!r}"))
        for alias, candidates in route.aliases.items():
            for j, candidate in enumerate(candidates):
                if candidate not in names:
                    problems.append(
                        (f"routes[{i}].aliases.{alias}[{j}]", f"unknown model {candidate!r}")
                    )
                elif candidates.index(candidate) != j:
                    # The router keeps state per model name: two entries would be one
                    # candidate counted twice (and its own alternate).
                    problems.append((f"routes[{i}].aliases.{alias}[{j}]",
                                     f"model {candidate!r} is listed twice"))
        if route.default is not None and route.default not in route.aliases:
            problems.append(
                (f"routes[{i}].default", f"{route.default!r} is not an alias of this route")
            )
    seen: dict[str, set[str]] = {"key_id": set(), "sha256": set()}
    for i, key in enumerate(doc.auth.api_keys):
        # A key_id twice: policies (subject.key_id) and records tell keys apart by it,
        # and revoking one by policy would hit both.
        for name, said in (("key_id", f"duplicate key_id {key.key_id!r}"),
                           ("sha256", "the same key is listed twice")):
            value = getattr(key, name)
            if value in seen[name]:
                problems.append((f"auth.api_keys[{i}].{name}", said))
            seen[name].add(value)
    problems += check_references({m.name: m for m in doc.models}, doc.routes, doc.ledger)
    if not (doc.auth.api_keys or doc.auth.jwt or doc.auth.trusted_tenant_header
            or doc.auth.anonymous_tenant):
        problems.append(("auth", "no identity source: set api_keys, jwt, "
                                 "trusted_tenant_header or anonymous_tenant"))
    return problems


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key a mapping gives twice."""


class _StrictLoader(KeyCheckingLoader):
    """Refuses a key a mapping gives twice: YAML would silently keep the last one. Merge
    keys (`<<: *defaults`) are fine: the mapping's own keys override merged ones."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        super().flatten_mapping(node)
        if self.duplicates:
            key_node, key = self.duplicates[0]
            raise _DuplicateKey(None, None, f"duplicate key {key!r}", key_node.start_mark)


def key_path(node: Any, line: int, key: str, path: str = "",
             searched: set[int] | None = None) -> str | None:
    """The full path (`routes[0].aliases.gpt-4o`) of the mapping key `key` repeated at
    `line` below `node`, a document as load_yaml keeps it: load_yaml names the key alone.
    `searched`: the nodes already searched in vain. A YAML alias is its anchor's node
    again, and aliases of aliases would have the walk read billions of nodes."""
    if isinstance(node, LineList):
        children = [(f"{path}[{i}]", item) for i, item in enumerate(node)]
    elif isinstance(node, LineDict):
        children = [(f"{path}.{k}" if path else str(k), v) for k, v in node.items()]
    else:
        return None
    searched = set() if searched is None else searched
    if id(node) in searched:
        return None
    # Innermost first: an outer mapping with the same key can span the line too.
    for child_path, child in children:
        found = key_path(child, line, key, child_path, searched)
        if found is not None:
            return found
    if isinstance(node, LineDict):
        # key_lines holds a key's last line: a repeat lies between the mapping's start
        # and that.
        for (child_path, _), k in zip(children, node, strict=True):
            if str(k) == key and node.line <= line <= node.key_lines[k]:
                return child_path
    searched.add(id(node))
    return None


def _duplicate_keys_error(text: str, source: str) -> ConfigError:
    """Every key the file gives twice, by its full path, as check names them (the
    loader stops at the first it meets, which need not be the first in the file)."""
    doc, problems = load_yaml(text, source)
    return ConfigError(source, [(key_path(doc, p.line, p.path) or p.path,
                                 f"duplicate key {p.path!r}" if p.path else p.reason)
                                for p in problems], [p.line for p in problems])


def parse(text: str, source: str, *, secrets: bool = True) -> Snapshot:
    """The snapshot of atp.yaml `text` read from `source`. `secrets=False` is for readers
    of its settings alone (`report savings`): what needs a secret from the environment
    (the redactor's HMAC key) is not built, so such a snapshot must never serve."""
    try:
        return _parse(text, source, secrets)
    except RecursionError:
        # YAML's composer, and the checks after it, recurse once per nesting level.
        raise ConfigError(source, [("", "nested too deeply")]) from None


def _validation_problems(exc: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    errors = exc.errors()
    locs = [tuple(e["loc"]) for e in errors]
    # A tuple whose only items are invalid also fails its min_length ("at least 1 item
    # ... not 0"): noise beside the errors that name those items.
    return [(tuple(e["loc"]), problem_reason(e)) for e in errors
            if not (e["type"] == "too_short" and any(
                len(loc) > len(e["loc"]) and loc[:len(e["loc"])] == tuple(e["loc"])
                for loc in locs))]


def _line_of_path(doc: Any, path: str) -> int:
    """The line of the deepest node a problem's path (`routes[0].aliases.gpt-4.1[2]`)
    reaches in `doc` as load_yaml keeps it; keys are matched against the document, as a
    key may itself hold dots."""
    line = getattr(doc, "line", 0)
    node, rest = doc, path
    while rest:
        if isinstance(node, LineList) and (index := re.match(r"\[(\d+)\]", rest)):
            i = int(index.group(1))
            if i >= len(node):
                break
            line, node, rest = node.item_lines[i], node[i], rest[index.end():]
        elif isinstance(node, LineDict):
            rest = rest.removeprefix(".")
            key = max((k for k in node if isinstance(k, str) and rest.startswith(k)
                       and rest[len(k):][:1] in ("", ".", "[")), key=len, default=None)
            if key is None:
                break
            line, node, rest = node.key_lines.get(key, line), node[key], rest[len(key):]
        else:
            break
    return line


def _validation_error(exc: ValidationError, text: str, source: str) -> ConfigError:
    """Pydantic's errors, each with the line of the value at fault (the file read again
    keeping lines: only when it has a problem)."""
    lined, _ = load_yaml(text, source)
    found = [(located(lined, loc), reason) for loc, reason in _validation_problems(exc)]
    return ConfigError(source, [(path, reason) for (path, _), reason in found],
                       [line for (_, line), _ in found])


def _parse(text: str, source: str, secrets: bool) -> Snapshot:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except _DuplicateKey:
        raise _duplicate_keys_error(text, source) from None
    except yaml.YAMLError as exc:
        line = error_line(exc, text)
        where = f"line {line}" if line else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [(where, f"invalid YAML: {reason}")]) from None
    except (ValueError, TypeError) as exc:
        # A scalar YAML resolves but Python refuses, e.g. the timestamp 2026-13-01.
        raise ConfigError(source, [("", f"invalid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, [("", "the file must hold a mapping (models:, routes:, ...)")])
    try:
        doc = _Document.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc, text, source) from None
    problems = _check_references(doc)
    if problems:
        lined, _ = load_yaml(text, source)
        raise ConfigError(source, problems, [_line_of_path(lined, path)
                                             for path, _ in problems])
    redactor = None
    if doc.redaction.enabled and secrets:
        try:
            redactor = Redactor(doc.redaction)
        except ValueError as exc:
            raise ConfigError(source, [("redaction", str(exc))]) from None
    known_classes = (*BUILTIN_CLASSES, *(d.name for d in doc.redaction.custom_detectors))
    try:
        policies, loaded = policy_set_from_config(text, source,
                                                  known_data_classes=known_classes)
    except PolicyError as exc:
        raise _policy_error(source, [(p.file, p.line, p.path, p.reason)
                                     for p in exc.details]) from None
    if not doc.redaction.enabled:
        blind = _reads_data_classes(policies.policies)
        # A redact policy with nothing to redact refuses every request it matches (fail
        # closed): an outage no dry run would show.
        unmet_all = [p for p in policies.policies if p.data_classes]
        if blind or unmet_all:
            raise _policy_error(source, [(p.source.file, p.source.line, p.id, (
                "reads request.data_classes, which only redaction fills: with redaction "
                "off it can never match (turn redaction on, or remove the policy)"))
                for p in blind] + [(p.source.file, p.source.line, p.id, (
                    f"requires redacting {', '.join(map(repr, sorted(p.data_classes)))}, "
                    "but redaction is off: every request it matches would be refused "
                    "(turn redaction on, or remove the policy)"))
                    for p in unmet_all if p not in blind])
    else:
        unmet = _unmet_redactions(policies.policies, doc.redaction.classes)
        if unmet:
            raise _policy_error(source, [(p.source.file, p.source.line, p.id, (
                f"requires redacting {', '.join(map(repr, off))}, which "
                "redaction.disabled_classes turns off: ATP would never redact it "
                "(enable the class, or take it out of data_classes)"))
                for p, off in unmet])
    models = {m.name: m for m in doc.models}
    ledger = doc.ledger
    if ledger.enabled and not Path(ledger.path).is_absolute():
        # Relative to the config file, so the ledger does not move with the working dir;
        # `..` in it is left to the OS, which reads it as it always did.
        path = directory_of(Path(source)) / ledger.path
        ledger = ledger.model_copy(update={"path": str(path)})
    if ledger.enabled and _is_dir(ledger.path):
        # Serve could not open it; check and reload must say so too.
        lined, _ = load_yaml(text, source)
        raise ConfigError(source, [("ledger.path", f"{ledger.path} is a directory, not a "
                                    "ledger file")], [_line_of_path(lined, "ledger.path")])
    return Snapshot(
        source=source,
        version=hashlib.sha256((text + loaded.digest).encode()).hexdigest()[:12],
        server=doc.server,
        auth=doc.auth,
        models=MappingProxyType(models),
        routes=doc.routes,
        api_keys=MappingProxyType({k.sha256: k for k in doc.auth.api_keys}),
        ledger=ledger,
        candidates=MappingProxyType({
            (route.name, alias): tuple(CandidateModel.from_model(models[n]) for n in names)
            for route in doc.routes for alias, names in route.aliases.items()}),
        # No set means no policy checks at all; `default: deny` must refuse even so.
        policies=policies if policies.policies or policies.settings.default == "deny"
        else None,
        policy_candidates=MappingProxyType({
            (route.name, alias): tuple(CandidateInfo.from_model(models[n]) for n in names)
            for route in doc.routes for alias, names in route.aliases.items()}),
        files=tuple(loaded.files),
        include_globs=loaded.include_globs,
        redactor=redactor,
    )


def check_paths(snapshot: Snapshot, *, listen_option: bool = False,
                ledger_open: str | None = None) -> None:
    """Raise ConfigError for what the file system shows now would keep serve from
    starting with `snapshot`: a ledger it could not open, a Unix socket it could not make
    (`listen_option`: --listen wins over server.listen, which is then not checked).
    `ledger_open`: the ledger a running serve writes, not checked again (a reload keeps
    it: a volume gone read-only since start refused every reload, an incident's new deny
    policy included).

    For check and reloads. Not part of parse: serve's start names the OS's own reason
    (exit 1), and `report savings` only reads the ledger. Host names and addresses are
    left to serve: whether they resolve and are this machine's depends on where it runs."""
    problems: list[tuple[str, str]] = []
    if snapshot.ledger.enabled and snapshot.ledger.path != ledger_open and (
            problem := _ledger_problem(Path(snapshot.ledger.path))):
        problems.append(("ledger.path", problem))
    socket_path = None if listen_option else unix_socket_path(snapshot.server.listen)
    if socket_path is not None and (problem := unix_socket_problem(socket_path)):
        problems.append(("server.listen", f"cannot listen on {snapshot.server.listen}: "
                                          f"{problem}"))
    if problems:
        # The lines only a problem needs: a second read of the file, then.
        try:
            lined, _ = load_yaml(Path(snapshot.source).read_text(encoding="utf-8"),
                                 snapshot.source)
        except (OSError, UnicodeDecodeError):
            lined = None
        raise ConfigError(snapshot.source, problems,
                          [_line_of_path(lined, path) for path, _ in problems])


def _policy_error(source: str, problems: list[tuple[str, int, str, str]]) -> ConfigError:
    """A ConfigError of `source` for policy problems (file, line, path, reason): one in
    `source` itself is written as its other problems are (`path: reason (line N)`); one
    in a policy file it names leads with that file's name and line."""
    return ConfigError(
        source,
        [(path if file == source
          else ": ".join(part for part in (f"{file}:{line}" if line else file, path) if part),
          reason) for file, line, path, reason in problems],
        [line if file == source else 0 for file, line, _, _ in problems])


def _unmet_redactions(policies: Any, scanned: tuple[str, ...]) -> list[tuple[Any, list[str]]]:
    """Redact policies naming classes redaction does not look for, with those classes:
    such a policy would pass the values on in clear."""
    out = []
    for p in policies:
        off = sorted(c for c in p.data_classes if c not in scanned)
        if off:
            out.append((p, off))
    return out


def _reads_data_classes(policies: Any) -> list[Any]:
    return [p for p in policies
            if any(a.startswith("request.data_classes") for a in p.attributes_used)]


NOT_A_FILE = (f"{NOT_REGULAR}: ATP reads atp.yaml more than once, and again when it "
              "changes; write it to a file")


def read_config_text(path: str | Path) -> str:
    """atp.yaml's text. ConfigError where it cannot be read, or is no regular file: a
    pipe (`check <(envsubst < atp.yaml)`) gave its text to the first read only, and the
    next found an empty file; one without a writer blocks."""
    text, why = read_regular(Path(path))
    if text is None:
        raise ConfigError(str(path), [("", NOT_A_FILE if why == NOT_REGULAR else why)])
    return text


def load(path: str | Path, *, secrets: bool = True) -> Snapshot:
    """The snapshot of the file at `path`; `secrets` as for parse."""
    return parse(read_config_text(path), str(path), secrets=secrets)


def files_read_by(path: str | Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The files load(path) would read and its policy.include globs, as a snapshot names
    them, found without compiling anything: what a watcher stamps before it loads."""
    loaded = load_file(path)
    return loaded.files, loaded.include_globs


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
