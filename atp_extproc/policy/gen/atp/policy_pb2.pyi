import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Subject(_message.Message):
    __slots__ = ("tenant", "user", "groups", "roles", "auth_method", "key_id", "claims")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    AUTH_METHOD_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    user: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    roles: _containers.RepeatedScalarFieldContainer[str]
    auth_method: str
    key_id: str
    claims: _struct_pb2.Struct
    def __init__(self, tenant: _Optional[str] = ..., user: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., roles: _Optional[_Iterable[str]] = ..., auth_method: _Optional[str] = ..., key_id: _Optional[str] = ..., claims: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Tool(_message.Message):
    __slots__ = ("name", "type", "declared", "called", "parameters", "arguments")
    class ArgumentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DECLARED_FIELD_NUMBER: _ClassVar[int]
    CALLED_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    declared: bool
    called: bool
    parameters: _containers.RepeatedScalarFieldContainer[str]
    arguments: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., declared: _Optional[bool] = ..., called: _Optional[bool] = ..., parameters: _Optional[_Iterable[str]] = ..., arguments: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("path", "operation", "alias", "stream", "token_estimate", "message_count", "tools", "tool_count", "tool_details", "tool_choice", "max_tokens", "data_classes", "metadata", "body_bytes", "choices")
    class DataClassesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOOL_DETAILS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DATA_CLASSES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    path: str
    operation: str
    alias: str
    stream: bool
    token_estimate: int
    message_count: int
    tools: _containers.RepeatedScalarFieldContainer[str]
    tool_count: int
    tool_details: _containers.RepeatedCompositeFieldContainer[Tool]
    tool_choice: str
    max_tokens: int
    data_classes: _containers.ScalarMap[str, int]
    metadata: _containers.ScalarMap[str, str]
    body_bytes: int
    choices: int
    def __init__(self, path: _Optional[str] = ..., operation: _Optional[str] = ..., alias: _Optional[str] = ..., stream: _Optional[bool] = ..., token_estimate: _Optional[int] = ..., message_count: _Optional[int] = ..., tools: _Optional[_Iterable[str]] = ..., tool_count: _Optional[int] = ..., tool_details: _Optional[_Iterable[_Union[Tool, _Mapping]]] = ..., tool_choice: _Optional[str] = ..., max_tokens: _Optional[int] = ..., data_classes: _Optional[_Mapping[str, int]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., body_bytes: _Optional[int] = ..., choices: _Optional[int] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("model", "provider", "region", "egress", "input_per_1k", "output_per_1k", "estimated_cost_usd", "cluster")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    INPUT_PER_1K_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PER_1K_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    model: str
    provider: str
    region: str
    egress: str
    input_per_1k: float
    output_per_1k: float
    estimated_cost_usd: float
    cluster: str
    def __init__(self, model: _Optional[str] = ..., provider: _Optional[str] = ..., region: _Optional[str] = ..., egress: _Optional[str] = ..., input_per_1k: _Optional[float] = ..., output_per_1k: _Optional[float] = ..., estimated_cost_usd: _Optional[float] = ..., cluster: _Optional[str] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("route", "time", "environment", "request_id", "config_version", "truncated")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    route: str
    time: _timestamp_pb2.Timestamp
    environment: str
    request_id: str
    config_version: str
    truncated: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, route: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., environment: _Optional[str] = ..., request_id: _Optional[str] = ..., config_version: _Optional[str] = ..., truncated: _Optional[_Iterable[str]] = ...) -> None: ...

class Attributes(_message.Message):
    __slots__ = ("subject", "request", "resource", "context", "tool", "candidates")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    subject: Subject
    request: Request
    resource: Resource
    context: Context
    tool: Tool
    candidates: _containers.RepeatedCompositeFieldContainer[Resource]
    def __init__(self, subject: _Optional[_Union[Subject, _Mapping]] = ..., request: _Optional[_Union[Request, _Mapping]] = ..., resource: _Optional[_Union[Resource, _Mapping]] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., tool: _Optional[_Union[Tool, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ...) -> None: ...
