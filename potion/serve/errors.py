"""Errors as OpenAI's clients expect them: a 4xx status and {"error": {"message", "type", "param", "code"}}, one
message a person can act on. A bad request never becomes a 500."""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.responses import JSONResponse

UNION_FIELDS = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "stop must be a string or a list of at most 4 strings",
}


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_validation(error: ValidationError, fields: list[str]) -> ApiError:
    """The first problem pydantic found, as one sentence that names the field."""
    e = error.errors(include_url=False)[0]
    loc = [str(part) for part in e["loc"]]
    kind = e["type"]
    if kind == "json_invalid":
        return ApiError(f"the request body is not valid JSON ({e['msg'].removeprefix('Invalid JSON: ')})")
    if not loc:
        return ApiError("the request body must be a JSON object")
    name = loc[0]
    if kind == "extra_forbidden":
        return ApiError(f"unknown field '{name}'; the fields are {', '.join(fields)}", name)
    if kind == "missing":
        return ApiError(f"'{name}' is required", name)
    if name in UNION_FIELDS:
        return ApiError(UNION_FIELDS[name], name)
    message = e["msg"][0].lower() + e["msg"][1:]
    got = json.dumps(e.get("input"), default=str)
    return ApiError(f"{'.'.join(loc)}: {message}, got {got[:80]}", name)
