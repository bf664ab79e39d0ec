"""OpenAI's wire format as the server speaks it: the request bodies (pydantic models, strict
types, the limits OpenAI documents, a field the server does not implement refused by name;
vLLM's /tokenize and /detokenize bodies too) and the error shape, ``{"error": {"message", "type",
"param", "code"}}``, including how a failed validation becomes one 400 with the field named.

``moorelm.serve.api`` uses these; nothing here knows the engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

from moorelm.jsonfile import lone_surrogate_at

MAX_REPETITION_PENALTY = 100.0  # generate.MAX_REPETITION_PENALTY (vLLM asks only > 0)
MAX_BAD_WORDS = 64  # banned phrases in one request
MAX_INSPECT_ALTERNATIVES = 20
MAX_STOPS = 16  # stop strings in one request (lm-eval's chain-of-thought tasks send 6+)
MAX_STOP_CHARS = 256  # characters in one stop string
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat bound; vLLM's default)

# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type_, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type,
                              self.headers)


def checked_text(value: str, param: str) -> str:
    """``value``, or a 400 naming ``param`` when it holds a lone surrogate (a JSON ``\\udXXX``
    escape that pairs with nothing: no bytes stand for it, so no token can)."""
    if lone_surrogate_at(value) is not None:
        raise ApiError(400, f"{param} is not valid Unicode text (it holds a lone surrogate)",
                       param)
    return value


def error_body(message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, param, code, type_), status_code=status,
                        headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_UNION_HELP = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists "
              "of token ids",
    "stop": f"must be a string or a list of at most {MAX_STOPS} strings, each at most "
            f"{MAX_STOP_CHARS} characters",
    "content": "must be a string or a list of text parts",
    "bad_words": "must be a string or a list of at most 64 strings",
}


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return error_response(400, f"request body is not valid JSON ({detail}); send a JSON "
                              "object with Content-Type: application/json", code="invalid_json")
    if err.get("type") == "extra_forbidden" and loc:
        name = ".".join(str(p) for p in loc)
        return error_response(400, f"{name}: this server does not implement {loc[-1]!r}; "
                              "leave it out (see docs/serving.md for the fields it takes)",
                              param=name, code="unsupported_parameter")
    path: list[str] = []
    for part in loc:
        if isinstance(part, str) and (part.lower() in _TYPE_TAGS or "[" in part
                                      or part.startswith("constrained-")):
            break  # the rest names a branch of a union type, not a field
        path.append(str(part))
    param = ".".join(path) or None
    message = err.get("msg", "invalid value")
    if path and path[-1] in _UNION_HELP and len(exc.errors()) > 1:
        message = _UNION_HELP[path[-1]]
    if not path:
        message = f"request body: {message}; send a JSON object"
    else:
        message = f"{param}: {message}"
    return error_response(400, message, param=param)


# ----------------------------------------------------------------------------- request models


def _asks_nothing(value: object) -> bool:
    return value is None or value == [] or value == {}


class _Body(BaseModel):
    """A request body: a field this server does not implement is refused (400 naming it),
    never ignored. One whose value asks for nothing (null, [] or {}, as clients that echo a
    whole message object send, e.g. ``"tool_calls": null``) is the same as leaving it out."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_empty_unknowns(cls, data: object) -> object:
        if isinstance(data, dict):
            known = cls.model_fields
            data = {k: v for k, v in data.items() if k in known or not _asks_nothing(v)}
        return data


class StreamOptions(_Body):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Body):
    """``response_format.json_schema``, OpenAI's shape: a name, the schema, strict."""

    name: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: StrictStr | None = None
    schema_: dict | StrictBool | None = Field(None, alias="schema")
    strict: StrictBool | None = None  # output always fits the schema, whatever this says


class ResponseFormat(_Body):
    """``response_format``: free text (the default), any JSON object, or JSON that fits a
    schema (decoding constrained by its grammar, ``moorelm.grammar``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingBody(_Body):
    model: StrictStr
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    top_k: StrictInt | None = Field(None, ge=1, description="moorelm extension: top-k sampling")
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: (Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]
           | Annotated[list[Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]],
                       Field(max_length=MAX_STOPS)] | None) = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, strict=True)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, strict=True)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id -> value in [-100, 100] added to its logit")
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: StrictStr | None = None
    # vLLM's extensions, with vLLM's names and ranges
    min_p: float | None = Field(None, ge=0, le=1, strict=True)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY, strict=True)
    bad_words: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_BAD_WORDS)] | None = (
        Field(None, description="phrases never produced, across token boundaries"))
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingBody):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(16, ge=0, description="0 only with echo (vLLM's)")
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = Field(False, description="the prompt comes back before the "
                             "completion, with its log-probs when logprobs is set")
    suffix: StrictStr | None = None
    best_of: StrictInt | None = Field(None, ge=1)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class ChatRequest(SamplingBody):
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)


class InspectRequest(_Body):
    """``POST /v1/inspect`` (a moorelm extension): score a text's tokens and read the
    attention of one layer (and head, else the mean over heads); with ``position`` only
    what that token attended to."""

    model: StrictStr
    prompt: StrictStr | list[StrictInt]
    top_logprobs: StrictInt = Field(5, ge=0, le=MAX_INSPECT_ALTERNATIVES)
    layer: StrictInt | None = Field(None, ge=-1024, description="default: the last; -1 counts back")
    head: StrictInt | None = Field(None, ge=0, description="default: the mean over heads")
    position: StrictInt | None = Field(None, ge=-(2**31), description="one query position")
    attention: StrictBool = True


class TokenizeRequest(_Body):
    """``POST /tokenize`` (vLLM's shape): a ``prompt``, or chat ``messages`` rendered as
    /v1/chat/completions renders them. moorelm's tokenizers add no special tokens, so
    ``add_special_tokens`` changes nothing; it is taken for vLLM's clients."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool | None = False


class DetokenizeRequest(_Body):
    """``POST /detokenize`` (vLLM's shape): token ids back to text."""

    model: StrictStr | None = None
    tokens: list[StrictInt]
