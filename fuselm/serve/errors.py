"""Errors as OpenAI's API reports them: a status code and `{"error": {message, type, param, code}}`.

Clients (the `openai` package among them) read the body to raise their own error
classes, so every refusal the server makes goes out in this one shape: a request
FastAPI cannot parse or validate (400, where FastAPI would answer 422), a value fuselm
refuses (400), a missing key (401), an unknown model or path (404), a full queue (503
with Retry-After) and a generation that failed (500).
"""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """A refusal: raised anywhere while handling a request, answered by `error_response`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def invalid_api_key() -> APIError:
    return APIError(401, "Incorrect or missing API key: send the header `Authorization: Bearer KEY`.",
                    code="invalid_api_key")


def overloaded(queued: int, retry_after_seconds: int) -> APIError:
    return APIError(503, f"The server is busy ({queued} requests are queued); retry later.",
                    type="server_error", code="overloaded", headers={"Retry-After": str(retry_after_seconds)})


def generation_failed(message: str) -> APIError:
    return APIError(500, f"Generation failed: {message}", type="server_error")


def shutting_down() -> APIError:
    return APIError(503, "The request was aborted: the server is shutting down.", type="server_error")


def field_named_in(message: str, fields) -> Optional[str]:
    """The field a fuselm ValueError is about: its messages start with the field's name
    ("top_p must be in (0, 1], got 1.5")."""
    first_word = message.split(" ", 1)[0]
    return first_word if first_word in fields else None


def validation_error(err: RequestValidationError) -> APIError:
    """FastAPI's validation failure (bad JSON, a wrong type, a missing field) as one 400:
    the first problem, named by its field."""
    problem = err.errors()[0]
    if problem.get("type") == "json_invalid":
        return bad_request(f"The body is not valid JSON: {problem.get('ctx', {}).get('error', problem['msg'])}")
    location = [str(part) for part in problem.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    param = location[0] if location else None
    return bad_request(f"{'.'.join(location)}: {problem['msg']}" if location else problem["msg"], param)


def _is_union_tag(part) -> bool:
    """Pydantic names the member of a union that failed in the location ("str", "list[int]")."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list", "none"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods: FastAPI's own 404 and 405, in the OpenAI shape.
        return APIError(err.status_code, str(err.detail), headers=getattr(err, "headers", None)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer is sent.
        return APIError(500, f"{type(err).__name__}: {err}", type="server_error").response()
