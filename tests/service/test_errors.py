from __future__ import annotations

from service.core.errors import ApiError, ErrorCode, error_body
from service.http.errors import summarize_validation_errors

EXPECTED = {
    "unknown_policy": 404,
    "invalid_request": 422,
    "empty_prompt": 422,
    "policy_too_long": 422,
    "too_many_policies": 422,
    "prompt_too_long": 413,
    "body_too_large": 413,
    "queue_full": 429,
    "not_ready": 503,
    "deadline_exceeded": 504,
    "internal_error": 500,
}


def test_status_of_every_code() -> None:
    for name, status in EXPECTED.items():
        assert ErrorCode(name).status == status
    assert all(isinstance(c.status, int) for c in ErrorCode)


def test_api_error_and_body() -> None:
    e = ApiError(ErrorCode.queue_full, "busy")
    assert e.status == 429 and e.headers["Retry-After"] == "1"
    assert error_body(ErrorCode.unknown_policy, "no", {"unknown": ["x"]}) == {
        "error": {"code": "unknown_policy", "message": "no", "details": {"unknown": ["x"]}}
    }


def test_validation_summary_never_echoes_input() -> None:
    huge = "x" * 100_000
    errors = [
        {"type": "string_type", "loc": ("body", "prompt"), "msg": "Input should be a valid string", "input": huge}
    ] * 50
    summary = summarize_validation_errors(errors)
    assert len(summary) == 20
    assert huge not in repr(summary)
    assert summary[0] == {"loc": ["body", "prompt"], "type": "string_type", "msg": "Input should be a valid string"}
