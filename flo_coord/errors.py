"""Typed errors. Every error flo_coord raises on purpose derives from FloCoordError.

Bad input is a ValidationError (a ValueError too) raised before anything touches Redis;
a declared constraint that fails (``flo_coord.constraints``) is reported through it with the
field, the value and what is allowed (README "Input limits", "Failure handling").
"""

from __future__ import annotations


class FloCoordError(Exception):
    """Base class of every error raised by flo_coord."""


class ValidationError(FloCoordError, ValueError):
    """Bad input from the caller (an id, a text, a number out of range, a request of the wrong
    shape). Raised before anything touches Redis; never msgspec's own ValidationError."""


class ConfigError(ValidationError):
    """An invalid configuration value or file (a TOML key, a config Struct's field, a
    deployment, a model group); the message names the key or field."""


class PoisonRequestError(ValidationError):
    """A queued entry no worker can run (not JSON, not UTF-8, fields of the wrong type).

    The worker that took it ends its request (when the entry names a valid request id) as
    Failed with this class name as ``error_kind``, acknowledges it, and goes on."""


class LeaseLostError(FloCoordError):
    """This worker no longer owns the request: its write changed nothing.

    ``current_owner``/``current_epoch`` describe who holds the request now (None when
    the request is gone); ``completed`` is True when the new owner already finished it.
    """

    def __init__(
        self,
        request_id: str,
        *,
        held_epoch: int,
        current_owner: str | None = None,
        current_epoch: int | None = None,
        completed: bool = False,
    ) -> None:
        self.request_id = request_id
        self.held_epoch = held_epoch
        self.current_owner = current_owner
        self.current_epoch = current_epoch
        self.completed = completed
        if completed:
            what = f"was completed by {current_owner!r} at epoch {current_epoch}"
        elif current_owner is None:
            what = "no longer exists"
        else:
            what = f"is now owned by {current_owner!r} at epoch {current_epoch}"
        super().__init__(f"lease lost on request {request_id!r} (held epoch {held_epoch}): it {what}")


class CorruptStateError(FloCoordError):
    """A key of one request holds data flo_coord did not write (wrong type or undecodable).

    Scoped to that one request (``request_id``) or, when ``request_id`` is empty, to the
    one namespace key named in ``detail``; nothing was changed by the call that raised it.
    """

    def __init__(self, request_id: str, detail: str) -> None:
        self.request_id = request_id
        self.detail = detail
        where = f"request {request_id!r}" if request_id else "a namespace key"
        super().__init__(f"{where} has corrupt or foreign data in Redis: {detail}")


class CoordinatorUnavailableError(FloCoordError):
    """Redis could not be reached within the configured deadline."""

    def __init__(self, operation: str, request_id: str | None, cause: BaseException | None) -> None:
        self.operation = operation
        self.request_id = request_id
        self.cause = cause
        where = f" for request {request_id!r}" if request_id else ""
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else "no reply"
        super().__init__(f"Redis unavailable during {operation}{where}: {detail}")


class GenerationError(FloCoordError):
    """A stream could not be finished: every eligible backend failed or the budget ran out.

    ``attempts`` lists the FailoverAttempt records of this request, in order.
    """

    def __init__(self, request_id: str, message: str, attempts: list | None = None) -> None:
        self.request_id = request_id
        self.attempts = list(attempts or [])
        super().__init__(message)


class ContentPolicyError(GenerationError):
    """A provider refused the request on content policy; it is not retried anywhere."""

    def __init__(self, request_id: str, reason: str, attempts: list | None = None) -> None:
        self.reason = reason
        super().__init__(request_id, f"content policy rejection: {reason}", attempts)


class RequestFailedError(GenerationError):
    """A followed request ended with an error recorded by the worker that ran it."""


class RequestCancelledError(RequestFailedError):
    """The request was cancelled (``Coordinator.cancel``, ``DELETE /v1/requests/{id}``): it
    ended Failed with ``error_kind`` "Cancelled". Raised to its followers and to the caller
    of ``Coordinator.stream`` on the replica that generated it."""


class UnknownRequestError(FloCoordError, LookupError):
    """No such request: never tracked, or its retention period is over."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        super().__init__(f"unknown request {request_id!r} (never tracked, or its retention period is over)")


class UnknownModelError(ValidationError, LookupError):
    """A request asked for a model that no configured model group serves (an OpenAI gateway's 404)."""


class PrivacyTierError(GenerationError):
    """Every deployment the request's privacy tier allows failed or was unavailable.

    ``excluded`` names the deployments the tier kept the prompt away from.
    """

    def __init__(self, request_id: str, message: str, excluded: list[str], attempts: list | None = None) -> None:
        self.excluded = list(excluded)
        super().__init__(request_id, message, attempts)
