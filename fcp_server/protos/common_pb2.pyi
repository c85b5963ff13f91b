from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResourceCompressionFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESOURCE_COMPRESSION_FORMAT_UNSPECIFIED: _ClassVar[ResourceCompressionFormat]
    RESOURCE_COMPRESSION_FORMAT_GZIP: _ClassVar[ResourceCompressionFormat]
RESOURCE_COMPRESSION_FORMAT_UNSPECIFIED: ResourceCompressionFormat
RESOURCE_COMPRESSION_FORMAT_GZIP: ResourceCompressionFormat

class Resource(_message.Message):
    __slots__ = ("uri", "client_cache_id", "max_age", "sha256_checksum", "compression_format")
    URI_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_FIELD_NUMBER: _ClassVar[int]
    SHA256_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FORMAT_FIELD_NUMBER: _ClassVar[int]
    uri: str
    client_cache_id: str
    max_age: _duration_pb2.Duration
    sha256_checksum: str
    compression_format: ResourceCompressionFormat
    def __init__(self, uri: _Optional[str] = ..., client_cache_id: _Optional[str] = ..., max_age: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., sha256_checksum: _Optional[str] = ..., compression_format: _Optional[_Union[ResourceCompressionFormat, str]] = ...) -> None: ...

class ResourceCapabilities(_message.Message):
    __slots__ = ("supported_compression_formats",)
    SUPPORTED_COMPRESSION_FORMATS_FIELD_NUMBER: _ClassVar[int]
    supported_compression_formats: _containers.RepeatedScalarFieldContainer[ResourceCompressionFormat]
    def __init__(self, supported_compression_formats: _Optional[_Iterable[_Union[ResourceCompressionFormat, str]]] = ...) -> None: ...

class ClientVersion(_message.Message):
    __slots__ = ("version_code",)
    VERSION_CODE_FIELD_NUMBER: _ClassVar[int]
    version_code: str
    def __init__(self, version_code: _Optional[str] = ...) -> None: ...

class RetryWindow(_message.Message):
    __slots__ = ("delay_min", "delay_max")
    DELAY_MIN_FIELD_NUMBER: _ClassVar[int]
    DELAY_MAX_FIELD_NUMBER: _ClassVar[int]
    delay_min: _duration_pb2.Duration
    delay_max: _duration_pb2.Duration
    def __init__(self, delay_min: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., delay_max: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RejectionReason(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[RejectionReason.Enum]
        NO_TASK_AVAILABLE: _ClassVar[RejectionReason.Enum]
        UNAUTHORIZED: _ClassVar[RejectionReason.Enum]
        UNAUTHENTICATED: _ClassVar[RejectionReason.Enum]
        CLIENT_VERSION_MISMATCH: _ClassVar[RejectionReason.Enum]
        NO_ACTIVE_TASK_EXISTS: _ClassVar[RejectionReason.Enum]
    UNKNOWN: RejectionReason.Enum
    NO_TASK_AVAILABLE: RejectionReason.Enum
    UNAUTHORIZED: RejectionReason.Enum
    UNAUTHENTICATED: RejectionReason.Enum
    CLIENT_VERSION_MISMATCH: RejectionReason.Enum
    NO_ACTIVE_TASK_EXISTS: RejectionReason.Enum
    def __init__(self) -> None: ...

class KeyAttestationAuthMetadata(_message.Message):
    __slots__ = ("challenge",)
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    def __init__(self, challenge: _Optional[bytes] = ...) -> None: ...

class AuthenticationMetadata(_message.Message):
    __slots__ = ("key_attestation_metadata",)
    KEY_ATTESTATION_METADATA_FIELD_NUMBER: _ClassVar[int]
    key_attestation_metadata: KeyAttestationAuthMetadata
    def __init__(self, key_attestation_metadata: _Optional[_Union[KeyAttestationAuthMetadata, _Mapping]] = ...) -> None: ...

class RejectionInfo(_message.Message):
    __slots__ = ("reason", "retry_window", "auth_metadata")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    AUTH_METADATA_FIELD_NUMBER: _ClassVar[int]
    reason: RejectionReason.Enum
    retry_window: RetryWindow
    auth_metadata: AuthenticationMetadata
    def __init__(self, reason: _Optional[_Union[RejectionReason.Enum, str]] = ..., retry_window: _Optional[_Union[RetryWindow, _Mapping]] = ..., auth_metadata: _Optional[_Union[AuthenticationMetadata, _Mapping]] = ...) -> None: ...

class MinimumSeparationPolicy(_message.Message):
    __slots__ = ("current_index", "minimum_separation")
    CURRENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_SEPARATION_FIELD_NUMBER: _ClassVar[int]
    current_index: int
    minimum_separation: int
    def __init__(self, current_index: _Optional[int] = ..., minimum_separation: _Optional[int] = ...) -> None: ...

class DataAvailabilityPolicy(_message.Message):
    __slots__ = ("min_example_count",)
    MIN_EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    min_example_count: int
    def __init__(self, min_example_count: _Optional[int] = ...) -> None: ...

class EligibilityPolicyEvalSpec(_message.Message):
    __slots__ = ("id", "min_sep_policy", "data_availability_policy")
    ID_FIELD_NUMBER: _ClassVar[int]
    MIN_SEP_POLICY_FIELD_NUMBER: _ClassVar[int]
    DATA_AVAILABILITY_POLICY_FIELD_NUMBER: _ClassVar[int]
    id: str
    min_sep_policy: MinimumSeparationPolicy
    data_availability_policy: DataAvailabilityPolicy
    def __init__(self, id: _Optional[str] = ..., min_sep_policy: _Optional[_Union[MinimumSeparationPolicy, _Mapping]] = ..., data_availability_policy: _Optional[_Union[DataAvailabilityPolicy, _Mapping]] = ...) -> None: ...

class EligibilityTaskInfo(_message.Message):
    __slots__ = ("eligibility_policies",)
    ELIGIBILITY_POLICIES_FIELD_NUMBER: _ClassVar[int]
    eligibility_policies: _containers.RepeatedCompositeFieldContainer[EligibilityPolicyEvalSpec]
    def __init__(self, eligibility_policies: _Optional[_Iterable[_Union[EligibilityPolicyEvalSpec, _Mapping]]] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
