"""Request and response bodies of the HTTP API, with the examples the OpenAPI schema shows.

Bad input is described by `RequestError`: an HTTP status, a machine-readable `reason` (also the
`reason` label of `polytask_rejected_requests_total`) and a message that names the problem.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

MAX_TEXTS_ENV = "POLYTASK_MAX_TEXTS"
DEFAULT_MAX_TEXTS = 64


def max_texts(env: dict[str, str] | None = None) -> int:
    """Most texts per request: $POLYTASK_MAX_TEXTS, default 64."""
    env = os.environ if env is None else env
    raw = env.get(MAX_TEXTS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_TEXTS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_TEXTS_ENV}={raw!r}: expected a positive integer")
    return int(raw)


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
        description="Texts to classify (non-empty strings); at most POLYTASK_MAX_TEXTS "
        "(default 64) per request. Longer texts than the model's limit are truncated.",
        # Strict: a number or null in the list is an error, not silently turned into a text.
        strict=True,
    )
    tasks: list[str] | None = Field(
        default=None, description="Tasks to answer (default: all). See GET /tasks.", strict=True
    )
    return_all_probabilities: bool = Field(
        default=False, description="Also return every label's probability."
    )

    @field_validator("texts")
    @classmethod
    def _check_texts(cls, texts: list[str], info: Any) -> list[str]:
        limit = (info.context or {}).get("max_texts") or max_texts()
        if not texts:
            raise PydanticCustomError("empty_list", "texts: the list is empty; send 1 or more")
        if len(texts) > limit:
            raise PydanticCustomError(
                "too_many_texts",
                "texts: {n} texts; at most {limit} per request ({env})",
                {"n": len(texts), "limit": limit, "env": MAX_TEXTS_ENV},
            )
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:
            raise PydanticCustomError(
                "empty_text", "texts{where}: empty or whitespace-only text", {"where": blank}
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


class TaskInfoOut(BaseModel):
    labels: list[str]
    dev_accuracy: float | None = Field(default=None, description="Percent, from training.")


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


def parse_predict_request(body: bytes, limit: int | None = None) -> PredictRequest:
    """Parse and validate a /predict body.

    Raises:
        RequestError: malformed JSON, a body that is not an object, missing `texts`, an empty
            list, an empty or non-string text, too many texts, bad `tasks`, unknown fields.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, "malformed_json", f"malformed JSON body: {err}") from None
    if not isinstance(data, dict):
        raise RequestError(
            422, "not_an_object", f"the body must be a JSON object, got {type(data).__name__}"
        )
    try:
        return PredictRequest.model_validate(data, context={"max_texts": limit})
    except ValidationError as err:
        raise request_error(err) from None


def request_error(err: ValidationError) -> RequestError:
    """The first validation error as a RequestError (422) whose message names the field."""
    messages = []
    reason = None
    for e in err.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in e["loc"])
        kind = e["type"]
        if kind == "missing":
            r = f"missing_{e['loc'][0]}"
            msg = f"{loc}: required field is missing"
        else:
            r = _REASONS.get(kind, kind)
            if e["loc"] and e["loc"][0] == "tasks" and kind == "string_type":
                r = "invalid_tasks"
            msg = e["msg"] if e["msg"].startswith(str(e["loc"][0])) else f"{loc}: {e['msg']}"
        reason = reason or r
        messages.append(msg)
    return RequestError(422, reason or "invalid_request", "; ".join(messages))
