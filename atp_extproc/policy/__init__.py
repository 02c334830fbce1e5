"""CEL attribute-based access control for LLM requests.

    loaded = settings.load_file("atp.yaml")            # policy: + policies: + includes
    policy_set = PolicySet.compile(loaded.policies, loaded.settings, "atp.yaml")
    attrs = build_attributes(subject={...}, request={...}, context={...})
    outcome = policy_set.evaluate(attrs, [CandidateInfo.from_model(m) for m in models])

See engine.py for the combining rules and examples/policies/README.md for the guide.
"""

from atp_extproc.policy.attributes import (
    MAX_LIST,
    MAX_MAP,
    MAX_STRING,
    Attributes,
    CandidateInfo,
    build_attributes,
    request_from_body,
)
from atp_extproc.policy.engine import (
    DEFAULT_DENY_ID,
    NO_CANDIDATE_ID,
    Decision,
    DecisionRecord,
    DecisionStats,
    Outcome,
    PolicySet,
)
from atp_extproc.policy.settings import (
    LoadedPolicies,
    PolicyError,
    PolicySettings,
    PolicySpec,
    Problem,
    SourcedPolicy,
    load_file,
    load_text,
)

__all__ = [
    "DEFAULT_DENY_ID",
    "MAX_LIST",
    "MAX_MAP",
    "MAX_STRING",
    "NO_CANDIDATE_ID",
    "Attributes",
    "CandidateInfo",
    "Decision",
    "DecisionRecord",
    "DecisionStats",
    "LoadedPolicies",
    "Outcome",
    "PolicyError",
    "PolicySet",
    "PolicySettings",
    "PolicySpec",
    "Problem",
    "SourcedPolicy",
    "build_attributes",
    "load_file",
    "load_text",
    "request_from_body",
]
