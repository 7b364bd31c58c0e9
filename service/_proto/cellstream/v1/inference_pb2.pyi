import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class State(_message.Message):
    __slots__ = ("model", "num_layers", "hidden_size", "h", "c", "position", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_layers: int
    hidden_size: int
    h: _containers.RepeatedScalarFieldContainer[float]
    c: _containers.RepeatedScalarFieldContainer[float]
    position: int
    model_version: int
    def __init__(self, model: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., h: _Optional[_Iterable[float]] = ..., c: _Optional[_Iterable[float]] = ..., position: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("model", "ttl_seconds", "initial_state", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    ttl_seconds: int
    initial_state: State
    model_version: int
    def __init__(self, model: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., initial_state: _Optional[_Union[State, _Mapping]] = ..., model_version: _Optional[int] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "model", "position", "expires_at", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    position: int
    expires_at: _timestamp_pb2.Timestamp
    model_version: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., position: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_version: _Optional[int] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class TokenSequence(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FloatSequence(_message.Message):
    __slots__ = ("values", "dim")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    dim: int
    def __init__(self, values: _Optional[_Iterable[float]] = ..., dim: _Optional[int] = ...) -> None: ...

class Outputs(_message.Message):
    __slots__ = ("logits", "top_k", "all_steps", "state", "gates")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ALL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    logits: bool
    top_k: int
    all_steps: bool
    state: bool
    gates: bool
    def __init__(self, logits: _Optional[bool] = ..., top_k: _Optional[int] = ..., all_steps: _Optional[bool] = ..., state: _Optional[bool] = ..., gates: _Optional[bool] = ...) -> None: ...

class LayerGates(_message.Message):
    __slots__ = ("forget", "input", "candidate", "cell", "output", "hidden")
    FORGET_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    forget: _containers.RepeatedScalarFieldContainer[float]
    input: _containers.RepeatedScalarFieldContainer[float]
    candidate: _containers.RepeatedScalarFieldContainer[float]
    cell: _containers.RepeatedScalarFieldContainer[float]
    output: _containers.RepeatedScalarFieldContainer[float]
    hidden: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, forget: _Optional[_Iterable[float]] = ..., input: _Optional[_Iterable[float]] = ..., candidate: _Optional[_Iterable[float]] = ..., cell: _Optional[_Iterable[float]] = ..., output: _Optional[_Iterable[float]] = ..., hidden: _Optional[_Iterable[float]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "tokens", "text", "features", "expected_position", "want", "tag")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITION_FIELD_NUMBER: _ClassVar[int]
    WANT_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens: TokenSequence
    text: str
    features: FloatSequence
    expected_position: int
    want: Outputs
    tag: int
    def __init__(self, session_id: _Optional[str] = ..., tokens: _Optional[_Union[TokenSequence, _Mapping]] = ..., text: _Optional[str] = ..., features: _Optional[_Union[FloatSequence, _Mapping]] = ..., expected_position: _Optional[int] = ..., want: _Optional[_Union[Outputs, _Mapping]] = ..., tag: _Optional[int] = ...) -> None: ...

class TokenProb(_message.Message):
    __slots__ = ("token", "prob", "text")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token: int
    prob: float
    text: str
    def __init__(self, token: _Optional[int] = ..., prob: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "position", "logits", "top", "state", "outputs", "gates")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    logits: _containers.RepeatedScalarFieldContainer[float]
    top: _containers.RepeatedCompositeFieldContainer[TokenProb]
    state: State
    outputs: _containers.RepeatedScalarFieldContainer[float]
    gates: _containers.RepeatedCompositeFieldContainer[LayerGates]
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., logits: _Optional[_Iterable[float]] = ..., top: _Optional[_Iterable[_Union[TokenProb, _Mapping]]] = ..., state: _Optional[_Union[State, _Mapping]] = ..., outputs: _Optional[_Iterable[float]] = ..., gates: _Optional[_Iterable[_Union[LayerGates, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "max_tokens", "temperature", "top_k", "seed", "stop", "tag", "gates")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: str
    max_tokens: int
    temperature: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    tag: int
    gates: bool
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., tag: _Optional[int] = ..., gates: _Optional[bool] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "tokens", "position", "done", "finish_reason", "gates")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    position: int
    done: bool
    finish_reason: str
    gates: _containers.RepeatedCompositeFieldContainer[LayerGates]
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., position: _Optional[int] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., gates: _Optional[_Iterable[_Union[LayerGates, _Mapping]]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StepRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[StepRequest, _Mapping]]] = ...) -> None: ...

class StepOutcome(_message.Message):
    __slots__ = ("tag", "response", "error")
    TAG_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    tag: int
    response: StepResponse
    error: Status
    def __init__(self, tag: _Optional[int] = ..., response: _Optional[_Union[StepResponse, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class StepBatchResult(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StepOutcome]
    def __init__(self, items: _Optional[_Iterable[_Union[StepOutcome, _Mapping]]] = ...) -> None: ...

class GenerateBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[GenerateRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[GenerateRequest, _Mapping]]] = ...) -> None: ...

class GenerateOutcome(_message.Message):
    __slots__ = ("tag", "session_id", "chunk", "error")
    TAG_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    tag: int
    session_id: str
    chunk: GenerateChunk
    error: Status
    def __init__(self, tag: _Optional[int] = ..., session_id: _Optional[str] = ..., chunk: _Optional[_Union[GenerateChunk, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class GenerateBatchResult(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[GenerateOutcome]
    def __init__(self, chunks: _Optional[_Iterable[_Union[GenerateOutcome, _Mapping]]] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "input_kind", "vocab_size", "feature_size", "num_layers", "hidden_size", "metadata", "is_default", "output_name", "gates", "version", "versions")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    input_kind: str
    vocab_size: int
    feature_size: int
    num_layers: int
    hidden_size: int
    metadata: _containers.ScalarMap[str, str]
    is_default: bool
    output_name: str
    gates: bool
    version: int
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, name: _Optional[str] = ..., input_kind: _Optional[str] = ..., vocab_size: _Optional[int] = ..., feature_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., is_default: _Optional[bool] = ..., output_name: _Optional[str] = ..., gates: _Optional[bool] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "state", "live_sessions")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: str
    live_sessions: int
    def __init__(self, version: _Optional[int] = ..., state: _Optional[str] = ..., live_sessions: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model", "versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, model: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...
