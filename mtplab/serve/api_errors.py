"""Errors in OpenAI's shape: every answer to a bad request is a 4xx whose body is `{"error":
{"message", "type", "param", "code"}}`, as the `openai` client expects; a 5xx would mean a bug in
mtplab (or, 503, a server that is shutting down)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

RETRY_AFTER_S = 5  # what a 503 (shutting down, the worker died) asks the client to wait


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    @classmethod
    def unavailable(cls, reason: str) -> APIError:
        """503: the server is shutting down or its model worker has died; the client may retry."""
        return cls(503, reason, type="server_error", code="unavailable",
                   headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # always encodable
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def check_text(text: str, param: str) -> None:
    """A 400 naming `param` for text that has no UTF-8 form (a lone UTF-16 surrogate, as JSON's
    `\\ud800` can write): the tokenizer cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param}: the text is not valid Unicode: {text[exc.start]!r} at "
                       f"character {exc.start} is a lone surrogate", param=param) from None
