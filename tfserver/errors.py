"""The exception tree: one root, `TFServerError`, and every error carries its HTTP status.

Errors a client may see are mapped to an RFC 9457 problem document in exactly one place
(`web.http11.Connection.send_problem`). Errors of start-up (`ConfigError`, and `AcmeError`,
`TypeSyntaxError`, `TokenError` in their own modules) hang under the same root and end the
start with one line. Anything that is not a `TFServerError` is a bug: the client gets a
bare 500 and the traceback goes to the log only. Foreign errors (botocore, jwt, acme,
subprocess) are translated at their module's boundary with `raise ... from e`.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One problem with one input field (a JSON path such as `tags.env`)."""

    field: str
    message: str


class TFServerError(Exception):
    """Root of every error that becomes an HTTP answer."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    type_slug: str = "about:blank"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = dict(extra or {})

    @property
    def title(self) -> str:
        """The standard phrase of the status."""
        return self.status.phrase

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 problem document for this error."""
        doc: dict[str, Any] = {
            "type": self.type_slug,
            "title": self.title,
            "status": int(self.status),
            "detail": self.detail,
        }
        doc.update(self.extra)
        return doc


class BadRequest(TFServerError):
    """The request is malformed (400)."""

    status = HTTPStatus.BAD_REQUEST


class InvalidInput(BadRequest):
    """The body does not match the module's variables (400 with every field error)."""

    def __init__(self, detail: str, errors: list[FieldError]) -> None:
        super().__init__(
            detail,
            extra={"errors": [{"field": e.field, "message": e.message} for e in errors]},
        )
        self.errors = errors


class Unauthorized(TFServerError):
    """No token, or a token that fails verification (401)."""

    status = HTTPStatus.UNAUTHORIZED

    def __init__(self, detail: str, *, error: str | None = "invalid_token") -> None:
        challenge = 'Bearer realm="tfserver"'
        if error:
            challenge += f', error="{error}"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(TFServerError):
    """A valid token without the needed scope (403)."""

    status = HTTPStatus.FORBIDDEN

    def __init__(self, detail: str, *, scope: str | None = None) -> None:
        challenge = 'Bearer realm="tfserver", error="insufficient_scope"'
        if scope:
            challenge += f', scope="{scope}"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class QuotaExceeded(TFServerError):
    """A quota of the policy is reached: 403 with the limit and the count."""

    status = HTTPStatus.FORBIDDEN

    def __init__(self, detail: str, *, limit: int, count: int) -> None:
        super().__init__(detail, extra={"limit": limit, "count": count})


class TooManyRuns(TFServerError):
    """The tenant's concurrent-run limit is reached (429, with `Retry-After`)."""

    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, detail: str, *, limit: int, retry_after: int = 10) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)},
                         extra={"limit": limit})


class TooManyStreams(TFServerError):
    """The tenant's limit of open event streams is reached (429, with `Retry-After`)."""

    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, detail: str, *, limit: int, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)},
                         extra={"limit": limit})


class NotFound(TFServerError):
    """Unknown module, instance or job (404)."""

    status = HTTPStatus.NOT_FOUND


class MethodNotAllowed(TFServerError):
    """The path exists but not with this method (405, with `Allow`)."""

    status = HTTPStatus.METHOD_NOT_ALLOWED

    def __init__(self, method: str, allowed: list[str]) -> None:
        super().__init__(
            f"{method} is not allowed here; use {', '.join(allowed)}",
            headers={"Allow": ", ".join(allowed)},
        )


class Conflict(TFServerError):
    """The instance is being changed by another run (409, with `Retry-After`)."""

    status = HTTPStatus.CONFLICT

    def __init__(
        self, detail: str, *, retry_after: int = 5, lock: dict[str, str] | None = None
    ) -> None:
        super().__init__(
            detail,
            headers={"Retry-After": str(retry_after)},
            extra={"lock": lock} if lock else None,
        )


class LengthRequired(TFServerError):
    """A body was sent without Content-Length (411)."""

    status = HTTPStatus.LENGTH_REQUIRED


class PayloadTooLarge(TFServerError):
    """The body is over TFSERVER_MAX_BODY (413)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(TFServerError):
    """The body is not `application/json` (415)."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class Rejected(TFServerError):
    """Terraform rejected the inputs at plan time (422)."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY


class UpstreamFailed(TFServerError):
    """The provider or cloud API failed during apply (502)."""

    status = HTTPStatus.BAD_GATEWAY


class RunKilled(UpstreamFailed):
    """Terraform died by a signal mid-run: its state lock may be left behind (502)."""

    def __init__(self, signal_number: int, instance: str) -> None:
        super().__init__(
            f"terraform was killed by signal {signal_number} during the run; the state of "
            f"instance {instance!r} may still be locked: GET the instance to see the lock, "
            "and an admin can clear it with DELETE .../lock"
        )


class Unavailable(TFServerError):
    """Too many runs at once, or not ready (503, with `Retry-After`)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, detail: str, *, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class Timeout(TFServerError):
    """The run passed its deadline and was interrupted (504)."""

    status = HTTPStatus.GATEWAY_TIMEOUT


class StoredProblem(TFServerError):
    """A problem document answered before, answered again (for example to an idempotent
    retry): its status and fields are the original answer's."""

    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(str(problem.get("detail", "")),
                         extra={k: v for k, v in problem.items()
                                if k not in ("type", "title", "status", "detail")})
        self.stored = problem
        try:
            self.status = HTTPStatus(int(problem.get("status", 500)))
        except (ValueError, TypeError):
            self.status = HTTPStatus.INTERNAL_SERVER_ERROR

    def problem(self) -> dict[str, Any]:
        """The stored document as it was."""
        return dict(self.stored)


class ConfigError(TFServerError):
    """The configuration cannot work; raised at start, before serving."""
