"""Request and response bodies of the HTTP API, with the examples the OpenAPI schema shows.

Bad input is described by `RequestError`: an HTTP status, a machine-readable `reason` (also the
`reason` label of `polytask_rejected_requests_total`) and a message that names the problem.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from serving.settings import (
    DEFAULT_MAX_TEXT_CHARS,
    DEFAULT_MAX_TEXTS,
    MAX_TEXT_CHARS_ENV,
    MAX_TEXTS_ENV,
    get_settings,
)

# Longest integer literal accepted in a body: no field takes a number, so anything longer is
# refused before Python's int() sees it (a 5,000-digit literal raised an error full of internals).
MAX_INT_DIGITS = 20
# Longest other number literal (a float): longer ones are refused like long integers.
MAX_NUMBER_CHARS = 40
# Where a message points at offending texts, at most this many indices are listed.
MAX_LISTED = 10
# A message reports at most this many problems ("...; and N more"), and quotes a client's
# value (a field or task name) cut to this many characters: an error is never larger than the
# request's first few problems, whatever the body holds (a 1 MB body once got a 24 MB answer).
MAX_REPORTED = 3
MAX_ECHO = 60
# Most task names in one request (a model has a handful); more are refused before validation.
MAX_TASKS = 100
# Characters that show nothing: controls, format characters (zero-width, BOM), separators,
# private use and unassigned code points. A text made only of these is empty for the model
# (the tokenizer reduces it to [CLS] [SEP]).
INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"})
FIELDS = ("texts", "tasks", "return_all_probabilities")


def max_texts() -> int:
    """Most texts per request: $POLYTASK_MAX_TEXTS, default 64."""
    return get_settings().max_texts


class PredictRequest(BaseModel):
    """Texts to classify; every task of the model unless `tasks` names a subset."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": ["a gripping, beautifully shot film", "what is the capital of peru ?"]},
                {
                    "texts": ["the battery died after two days"],
                    "tasks": ["cr", "subj"],
                    "return_all_probabilities": True,
                },
            ]
        },
    )

    texts: list[str] = Field(
        description=f"Texts to classify (non-empty strings); at most {MAX_TEXTS_ENV} "
        f"(default {DEFAULT_MAX_TEXTS}) per request and {MAX_TEXT_CHARS_ENV} (default "
        f"{DEFAULT_MAX_TEXT_CHARS:,}) characters per text (longer: 422 naming the text's "
        "index). Texts longer than the model's token limit are truncated (`truncated` in the "
        "answer). Lone UTF-16 surrogates (e.g. an unpaired \\ud800 escape) are refused.",
        # Strict: a number or null in the list is an error, not silently turned into a text.
        strict=True,
    )
    tasks: list[str] | None = Field(
        default=None, description="Tasks to answer (default: all). See GET /tasks.", strict=True
    )
    return_all_probabilities: bool = Field(
        default=False,
        description='Also return every label\'s probability (a JSON boolean; no "yes" or 1).',
        strict=True,
    )

    @field_validator("texts")
    @classmethod
    def _check_texts(cls, texts: list[str], info: Any) -> list[str]:
        context = info.context or {}
        limit = context.get("max_texts") or max_texts()
        max_chars = context.get("max_text_chars") or get_settings().max_text_chars
        if not texts:
            raise PydanticCustomError("empty_list", "texts: the list is empty; send 1 or more")
        if len(texts) > limit:
            raise PydanticCustomError(
                "too_many_texts",
                "texts: {n} texts; at most {limit} per request ({env})",
                {"n": len(texts), "limit": limit, "env": MAX_TEXTS_ENV},
            )
        # Length first: the other checks then never walk a huge text.
        long = [i for i, t in enumerate(texts) if len(t) > max_chars]
        if long:
            raise PydanticCustomError(
                "text_too_long",
                "texts{where}: {n} characters; at most {limit} per text ({env})",
                {
                    "where": _indices(long),
                    "n": f"{len(texts[long[0]]):,}",
                    "limit": f"{max_chars:,}",
                    "env": MAX_TEXT_CHARS_ENV,
                },
            )
        blank = blank_texts(texts)
        if blank:
            raise PydanticCustomError(
                "empty_text",
                "texts{where}: empty text (nothing but whitespace or invisible characters)",
                {"where": _indices(blank)},
            )
        # JSON can carry an unpaired surrogate escape ("\\ud800"); Python keeps it in the
        # string, but it is not Unicode text and the tokenizer raises on it.
        invalid = non_unicode_texts(texts)
        if invalid:
            raise PydanticCustomError(
                "invalid_text",
                "texts{where}: not valid Unicode text (an unpaired UTF-16 surrogate)",
                {"where": _indices(invalid)},
            )
        return texts

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, tasks: list[str] | None) -> list[str] | None:
        if tasks is not None and not tasks:
            raise PydanticCustomError(
                "empty_tasks", "tasks: the list is empty; leave it out to get every task"
            )
        return tasks


class TaskAnswer(BaseModel):
    label: str = Field(description="The most probable label.")
    probability: float = Field(description="Its probability (softmax of the task's logits).")
    probabilities: dict[str, float] | None = Field(
        default=None, description="Every label's probability, when requested."
    )


class TextAnswer(BaseModel):
    tasks: dict[str, TaskAnswer] = Field(description="Per requested task, its answer.")
    truncated: bool = Field(description="The text exceeded the model's max length and was cut.")


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {
                            "tasks": {
                                "sst2": {"label": "positive", "probability": 0.93},
                                "subj": {"label": "subjective", "probability": 0.88},
                            },
                            "truncated": False,
                        }
                    ],
                    "model_version": "polytask-senteval6:4xk2q3dbxkqf2aav",
                }
            ]
        }
    )

    results: list[TextAnswer] = Field(description="One entry per input text, in order.")
    model_version: str = Field(description="The model store tag that answered.")


class CalibrationOut(BaseModel):
    method: Literal["temperature", "temperature+isotonic"] = Field(
        default="temperature",
        description="temperature: logits / T; temperature+isotonic: then the answered label's "
        "probability through a monotone map fitted on dev (the answer never changes).",
    )
    temperature: float = Field(description="The task's logits are divided by it before softmax.")
    ece_before: float = Field(description="Dev expected calibration error with T = 1, percent.")
    ece_after: float = Field(
        description="Dev expected calibration error after calibration, cross-fitted, percent "
        "(15 bins)."
    )


class OwnRouteOut(BaseModel):
    against: Literal["shared", "private"] = Field(description="The route it was weighed against.")
    accuracy: float = Field(description="Dev accuracy of the own path, percent.")
    difference: float = Field(description="own - that route, points.")
    standard_error: float = Field(description="Of the paired difference, points.")
    p_value: float = Field(description="One-sided: P(own leading by this much | paths equal).")
    margin_se: float = Field(description="Standard errors it had to lead by.")
    layers: int = Field(description="Top encoder blocks it copies (run once more per call).")


class RouteOut(BaseModel):
    path: Literal["shared", "private", "own"] = Field(
        description="shared: R_i -> B -> A_i; private: the task's own head on the encoder; "
        "own: the task's own copy of the encoder's top blocks and its own head."
    )
    shared_accuracy: float = Field(description="Dev accuracy of the shared path, percent.")
    private_accuracy: float = Field(description="Dev accuracy of the private path, percent.")
    difference: float = Field(description="private - shared, points.")
    standard_error: float = Field(description="Of the paired difference, points.")
    p_value: float = Field(
        description="One-sided: the path that is not preferred better than the preferred one."
    )
    prefer: Literal["shared", "private"] = Field(
        default="shared", description="The path the task keeps unless dev shows the other better."
    )
    own: OwnRouteOut | None = Field(
        default=None, description="The own path's evidence, when the run trained one."
    )


class TaskInfoOut(BaseModel):
    labels: list[str]
    dev_accuracy: float | None = Field(default=None, description="Percent, from training.")
    route: RouteOut | None = Field(
        default=None, description="The path that answers the task and its dev evidence."
    )
    calibration: CalibrationOut | None = Field(
        default=None, description="Calibration fitted on dev; null: none (T = 1)."
    )


class TasksResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_version": "polytask-senteval6:4xk2q3dbxkqf2aav",
                    "precision": "fp32",
                    "max_length": 128,
                    "tasks": {"sst2": {"labels": ["negative", "positive"], "dev_accuracy": 84.2}},
                }
            ]
        }
    )

    model_version: str
    precision: str
    max_length: int = Field(description="Texts are truncated to this many tokens.")
    tasks: dict[str, TaskInfoOut]
    fallback: str | None = Field(
        default=None,
        description="Why the service answers with another model than the store's promoted "
        "(or latest) one, which failed to load; null when it serves that model.",
    )


class ErrorResponse(BaseModel):
    error: str = Field(description="What is wrong with the request.")
    reason: str = Field(description="Machine-readable reason, e.g. empty_text, unknown_task.")


class RequestError(Exception):
    """A rejected request: HTTP status, reason (a metric label) and a message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def body(self) -> dict[str, str]:
        return ErrorResponse(error=self.message, reason=self.reason).model_dump()


# pydantic error types -> reason labels; bounded, so fine as a Prometheus label.
_REASONS = {
    "string_type": "non_string_text",
    "list_type": "texts_not_a_list",
    "extra_forbidden": "unknown_field",
    "bool_type": "invalid_field",
    "bool_parsing": "invalid_field",
    "model_type": "not_an_object",
}


def _indices(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:MAX_LISTED]))
    return f"[{shown}{', ...' if len(indices) > MAX_LISTED else ''}]"


def blank_texts(texts: list[str]) -> list[int]:
    """Indices of the texts that /predict refuses as `empty_text` (`polytask predict` too)."""
    return [i for i, t in enumerate(texts) if _is_blank(t)]


def non_unicode_texts(texts: list[str]) -> list[int]:
    """Indices of the texts that /predict refuses as `invalid_text`: lone surrogates, from a
    JSON escape or (`polytask predict`) from invalid UTF-8 in the command line."""
    return [i for i, t in enumerate(texts) if not _is_unicode(t)]


def _is_blank(text: str) -> bool:
    """No visible character (`INVISIBLE` categories); stops at the first visible one, after
    the whitespace at either end (stripped in C)."""
    return all(unicodedata.category(c) in INVISIBLE for c in text.strip())


def quote(value: object, limit: int = MAX_ECHO) -> str:
    """A client's value for a message: repr-escaped (controls, surrogates) and cut short."""
    text = str(value)
    shown = repr(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text):,} characters)"


def some(items: list[str], limit: int = MAX_REPORTED) -> str:
    """`items` joined by "; ", at most `limit` of them, then "and N more"."""
    shown = "; ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}; and {len(items) - limit:,} more"


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _BadNumber(ValueError):
    pass


def _parse_int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _BadNumber(f"a number with {digits:,} digits; at most {MAX_INT_DIGITS}")
    return int(literal)


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _BadNumber(f"a number of {len(literal):,} characters; at most {MAX_NUMBER_CHARS}")
    value = float(literal)
    if not math.isfinite(value):  # 1e999
        raise _BadNumber("a number out of range")
    return value


def _parse_constant(name: str) -> float:
    raise _BadNumber(f"{name} is not valid JSON")


def parse_predict_request(
    body: bytes, limit: int | None = None, max_text_chars: int | None = None
) -> PredictRequest:
    """Parse and validate a /predict body (its size was bounded by the caller).

    Every message is plain words about the body: no Python internals, no paths.

    Raises:
        RequestError: 400 for a body that is not UTF-8 JSON (malformed, invalid UTF-8, nested
            too deeply, an absurd number, NaN/Infinity); 422 for valid JSON that is not a
            valid request (not an object, missing `texts`, an empty list, an empty, too long,
            non-string or non-Unicode text, too many texts, bad `tasks`, a non-boolean
            `return_all_probabilities`, unknown fields).
    """
    if body.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark: tolerated, not JSON
        body = body[3:]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(
            400, "invalid_utf8", f"the body is not valid UTF-8 (byte {err.start})"
        ) from None
    try:
        data = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except json.JSONDecodeError as err:
        # Some of json's messages end in "at" ("Invalid control character at").
        what = err.msg.removesuffix(" at")
        raise RequestError(
            400,
            "malformed_json",
            f"malformed JSON body: {what} at line {err.lineno}, column {err.colno}",
        ) from None
    except _BadNumber as err:
        raise RequestError(400, "malformed_json", f"malformed JSON body: {err}") from None
    except RecursionError:
        raise RequestError(400, "json_too_deep", "malformed JSON body: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(
            422, "not_an_object", f"the body must be a JSON object, got {_json_type(data)}"
        )
    check_shape(data, limit or max_texts())
    context = {"max_texts": limit, "max_text_chars": max_text_chars}
    try:
        return PredictRequest.model_validate(data, context=context)
    except ValidationError as err:
        raise request_error(err) from None
    except RecursionError:  # a deeply nested value that json accepted but validation did not
        raise RequestError(
            422, "json_too_deep", "a value in the body is nested too deeply"
        ) from None


def check_shape(data: dict[str, Any], limit: int) -> None:
    """What is refused before pydantic looks at any item, so that the work and the message
    stay bounded whatever the body holds: unknown fields, and lists longer than allowed (a
    1 MB list of 500,000 numbers is refused by its length, not with an error per item).

    Raises:
        RequestError: 422 `unknown_field` (`missing_texts` when `texts` is missing too),
            `too_many_texts` or `too_many_tasks`.
    """
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        names = ", ".join(quote(k) for k in unknown[:MAX_REPORTED])
        more = f" and {len(unknown) - MAX_REPORTED:,} more" if len(unknown) > MAX_REPORTED else ""
        message = f"unknown field(s) {names}{more}; valid fields are {', '.join(FIELDS)}"
        if "texts" not in data:  # e.g. "text": the missing field is the reason
            raise RequestError(422, "missing_texts", f"texts: required field is missing; {message}")
        raise RequestError(422, "unknown_field", message)
    texts = data.get("texts")
    if isinstance(texts, list) and len(texts) > limit:
        raise RequestError(
            422,
            "too_many_texts",
            f"texts: {len(texts):,} texts; at most {limit} per request ({MAX_TEXTS_ENV})",
        )
    tasks = data.get("tasks")
    if isinstance(tasks, list) and len(tasks) > MAX_TASKS:
        raise RequestError(
            422, "too_many_tasks", f"tasks: {len(tasks):,} tasks; at most {MAX_TASKS}"
        )


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def request_error(err: ValidationError) -> RequestError:
    """A RequestError (422) for validation errors: the first one's reason, and a message
    naming the field of each, at most `MAX_REPORTED` of them (`some`)."""
    messages = []
    reason = None
    for e in err.errors(include_url=False, include_input=False):
        # loc can be empty: pydantic reports a field name that is not valid Unicode (a lone
        # surrogate escape) with no location.
        first = str(e["loc"][0]) if e["loc"] else ""
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        if len(loc) > MAX_ECHO or not loc.isprintable():
            loc = quote(loc)
        kind = e["type"]
        if kind == "missing":
            r = f"missing_{first}" if first in FIELDS else "invalid_request"
            msg = f"{loc}: required field is missing"
        elif kind == "string_unicode" and not e["loc"]:
            r = "invalid_field"
            msg = "a field name is not valid Unicode text (an unpaired UTF-16 surrogate)"
        else:
            r = _REASONS.get(kind, kind)
            if first == "tasks" and kind in ("string_type", "list_type"):
                r = "invalid_tasks"
            msg = e["msg"] if e["msg"].startswith(first) and first else f"{loc}: {e['msg']}"
        reason = reason or r
        messages.append(msg)
    return RequestError(422, reason or "invalid_request", some(messages))
