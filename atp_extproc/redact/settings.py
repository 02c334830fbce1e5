"""The `redaction:` section of atp.yaml.

Validated at load like the rest of the config: a bad custom pattern, an unknown data class
or a malformed path is an error that names the field, never a surprise at request time.
The HMAC key for the `hash` action is read from the environment variable named here, never
from the YAML file itself.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from atp_extproc.settings_types import Flag, Frozen, Items

Action = Literal["mask", "hash", "deny"]

# Built-in data classes, in the order their placeholders are listed in docs.
BUILTIN_CLASSES: tuple[str, ...] = (
    "email", "phone", "ssn", "card", "iban", "ipv4", "ipv6",
    "cloud_key", "api_key", "github_token", "slack_token", "jwt", "private_key", "password",
)
# A private key cannot be partially useful to a model, and one in a prompt is almost
# always a mistake worth stopping: refuse the request unless the config says otherwise.
DEFAULT_ACTIONS: dict[str, Action] = {"private_key": "deny"}

DEFAULT_PHONE_REGIONS: tuple[str, ...] = (
    "US", "CA", "GB", "DE", "FR", "ES", "IT", "NL", "BR", "IN", "JP", "AU",
)

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# extra_paths: dotted keys, `[*]` for every list element, `[N]` for one, `*` for every
# value of an object. Example: `tools[*].function.description`, `response_format.*`
# (`metadata` is scanned anyway).
_PATH = re.compile(r"^[A-Za-z0-9_$-]+(?:\[(?:\*|\d{1,6})\])*"
                   r"(?:\.(?:\*|[A-Za-z0-9_$-]+)(?:\[(?:\*|\d{1,6})\])*)*$")
_PATH_TOKEN = re.compile(r"\[(\*|\d+)\]|\.?([^.\[\]]+)")


def compile_custom(pattern: str, case_insensitive: bool = False):
    """Compile a custom detector pattern with RE2; ValueError with RE2's reason if bad."""
    import re2

    from atp_extproc.redact.re2util import re2_options

    try:
        compiled = re2.compile(pattern, re2_options(not case_insensitive, 32 << 20))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(f"invalid RE2 pattern {pattern!r}: {reason}") from None
    if compiled.fullmatch("") is not None:
        raise ValueError(f"pattern {pattern!r} matches the empty string; a detector must "
                         "match at least one character")
    return compiled


class CustomDetector(Frozen):
    """A named RE2 pattern; matches are a data class of their own (`[NAME_1]`)."""

    name: str
    pattern: str = Field(min_length=1, max_length=4096)
    case_insensitive: Flag = False

    @field_validator("name")
    @classmethod
    def _name_ok(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError("must be 1 to 32 characters: a lowercase letter, then lowercase "
                             "letters, digits or '_'")
        if name in BUILTIN_CLASSES:
            raise ValueError(f"{name!r} is a built-in data class; choose another name")
        return name

    @model_validator(mode="after")
    def _compiles(self) -> CustomDetector:
        compile_custom(self.pattern, self.case_insensitive)
        return self


def parse_path(path: str) -> tuple[str | int, ...]:
    """`a.b[*].c[2]` → ('a', 'b', '*', 'c', 2); '*' in a list position means every element."""
    if not _PATH.fullmatch(path):
        raise ValueError(f"malformed path {path!r}: use dotted keys with [*] or [N], "
                         "e.g. 'tools[*].function.description'")
    out: list[str | int] = []
    for index, key in _PATH_TOKEN.findall(path):
        if index:
            out.append("*" if index == "*" else int(index))
        else:
            out.append(key)
    return tuple(out)


class RedactionSettings(Frozen):
    enabled: Flag = True
    # Per data class (built-in or custom): mask | hash | deny. Unlisted classes use
    # DEFAULT_ACTIONS, then `mask`.
    actions: dict[str, Action] = Field(default_factory=dict)
    # Name of the environment variable holding the HMAC key for `hash` (>= 16 bytes).
    hmac_key_env: str = "ATP_REDACT_HMAC_KEY"
    custom_detectors: Items[CustomDetector] = ()
    # Data classes not looked for at all.
    disabled_classes: Items[str] = ()
    # More JSON paths to scan, for every operation (missing paths are skipped).
    extra_paths: Items[str] = ()
    # Regions whose national formats are recognised (numbers with +CC are always).
    phone_regions: Items[str] = DEFAULT_PHONE_REGIONS
    # Put originals back into responses; off unless a route turns it on.
    restore: Flag = False
    # A body too costly to scan completely (adversarial input; the work budget is about
    # 8 units per 64 bytes, far above real prompts) is refused unless this says `allow`.
    on_incomplete: Literal["deny", "allow"] = "deny"

    @field_validator("hmac_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not _ENV.fullmatch(value):
            raise ValueError("must be an environment variable name (letters, digits, '_'); "
                             "the key itself never goes in the config file")
        return value

    @field_validator("extra_paths")
    @classmethod
    def _paths(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            parse_path(path)
        return paths

    @field_validator("phone_regions")
    @classmethod
    def _regions(cls, regions: tuple[str, ...]) -> tuple[str, ...]:
        import phonenumbers

        out = []
        for region in regions:
            upper = region.upper()
            if upper not in phonenumbers.SUPPORTED_REGIONS:
                raise ValueError(f"unknown phone region {region!r}; use ISO 3166 codes such "
                                 "as 'US', 'GB', 'DE'")
            out.append(upper)
        return tuple(dict.fromkeys(out))

    @model_validator(mode="after")
    def _known_classes(self) -> RedactionSettings:
        names = [d.name for d in self.custom_detectors]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise ValueError(f"custom_detectors: duplicate name {name!r}")
        known = set(BUILTIN_CLASSES) | set(names)
        for where, classes in (("actions", self.actions), ("disabled_classes",
                                                             self.disabled_classes)):
            for name in classes:
                if name not in known:
                    raise ValueError(f"{where}: unknown data class {name!r}; known: "
                                     f"{sorted(known)}")
        return self

    def action_for(self, data_class: str) -> Action:
        return self.actions.get(data_class, DEFAULT_ACTIONS.get(data_class, "mask"))

    @property
    def classes(self) -> tuple[str, ...]:
        """Every data class that is looked for."""
        return tuple(c for c in (*BUILTIN_CLASSES, *(d.name for d in self.custom_detectors))
                     if c not in self.disabled_classes)
