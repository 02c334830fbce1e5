"""PII and secret redaction for request bodies, and restore for responses.

    redactor = Redactor(settings)                 # once per config snapshot
    result = redactor.redact("chat", doc, tenant)  # per request; doc is not modified
    result.fields / counts / denied / non_text_parts / mapping / incomplete
    Restorer(result.mapping).restore_json(body) or .feed(chunk, end)   # per response
"""

from atp_extproc.redact.redactor import (
    OPERATIONS,
    PlaceholderMap,
    Redaction,
    Redactor,
    Span,
)
from atp_extproc.redact.restore import Restorer
from atp_extproc.redact.settings import (
    BUILTIN_CLASSES,
    DEFAULT_ACTIONS,
    CustomDetector,
    RedactionSettings,
)

__all__ = [
    "BUILTIN_CLASSES",
    "DEFAULT_ACTIONS",
    "OPERATIONS",
    "CustomDetector",
    "PlaceholderMap",
    "Redaction",
    "RedactionSettings",
    "Redactor",
    "Restorer",
    "Span",
]
