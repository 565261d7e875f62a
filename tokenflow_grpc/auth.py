"""API key authentication of TokenFlowService calls, as a grpc.aio server interceptor.

A call carries its key as `authorization: Bearer KEY` or `x-api-key: KEY`
metadata. The interceptor rejects a call without a known key with
UNAUTHENTICATED, and a call to an admin-only method from a user key with
PERMISSION_DENIED. An admitted call runs with its key in current_key(),
where the servicer finds the client identity, the key's limit and whether
prompts may be shown. Other services (health, reflection) stay open.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn

import grpc

from tokenflow_grpc.apikeys import ApiKey, KeyStore
from tokenflow_grpc.errors import PermissionDeniedError, TokenFlowError, UnauthenticatedError
from tokenflow_grpc.logs import RepeatLimiter
from tokenflow_grpc.settings import MAX_RATE_LIMIT, Settings
from tokenflow_grpc.status import to_status

logger = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
API_KEY = "x-api-key"
BEARER = "bearer"
# Methods of TokenFlowService that need the admin role.
ADMIN_METHODS = ("Simulate",)
# Replacement for the prompt of activity events sent to non-admin keys.
PROMPT_REDACTED = "[redacted]"

_current_key: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar(
    "tokenflow_api_key", default=None
)


def current_key() -> ApiKey | None:
    """Return the key of the call being served, or None when authentication is off."""
    return _current_key.get()


def may_read_prompts() -> bool:
    """Return True when the current call may see prompt text: admin keys, or no authentication."""
    key = current_key()
    return key is None or key.is_admin


def redact_prompts(events: Iterable[Any]) -> None:
    """Replace the prompt of each activity event message with PROMPT_REDACTED,
    unless the current call may read prompts."""
    if may_read_prompts():
        return
    for event in events:
        if event.prompt:
            event.prompt = PROMPT_REDACTED


def load_key_store(settings: Settings) -> KeyStore | None:
    """Return the keys of --api-keys or --api-keys-file, or None when neither is set."""
    if settings.api_keys_file:
        return KeyStore.from_file(settings.api_keys_file, MAX_RATE_LIMIT)
    if settings.api_keys:
        return KeyStore.from_toml(
            settings.api_keys, "--api-keys (TOKENFLOW_API_KEYS)", MAX_RATE_LIMIT
        )
    return None


def interceptors_for(settings: Settings, service: str) -> list[Any]:
    """Return the server interceptors that authenticate calls to service, none
    when no keys are set; raise ConfigurationError for an invalid key list."""
    store = load_key_store(settings)
    if store is None:
        return []
    logger.info("loaded %d API keys; every call to %s needs one", len(store.keys), service)
    return [AuthInterceptor(store, service, ADMIN_METHODS)]


def presented_secret(metadata: Iterable[tuple[str, Any]]) -> str:
    """Return the API key sent in metadata; raise UnauthenticatedError when there is none
    or the metadata is ambiguous."""
    secrets: set[str] = set()
    for name, value in metadata:
        if not isinstance(value, str):
            continue
        if name == AUTHORIZATION:
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() != BEARER or not credentials.strip():
                raise UnauthenticatedError(
                    "the authorization metadata must be `Bearer KEY`; other schemes are "
                    "not supported"
                )
            secrets.add(credentials.strip())
        elif name == API_KEY:
            secrets.add(value.strip())
    if not secrets or secrets == {""}:
        raise UnauthenticatedError(
            "missing API key: send `authorization: Bearer KEY` or `x-api-key: KEY` "
            "(in HTTP, the Authorization or X-API-Key header)"
        )
    if len(secrets) > 1:
        raise UnauthenticatedError(
            "the call sends more than one API key; send one in authorization or in x-api-key"
        )
    return secrets.pop()


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call to one service and checks the role of admin-only methods."""

    def __init__(self, store: KeyStore, service: str, admin_methods: Iterable[str]) -> None:
        """service: full name of the protected service; admin_methods: its method names
        that need the admin role."""
        self.store = store
        self.prefix = f"/{service}/"
        self.admin_paths = frozenset(self.prefix + name for name in admin_methods)
        self._warnings = RepeatLimiter(logger)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        admin_only = method in self.admin_paths
        if handler.unary_unary is not None:
            return handler._replace(
                unary_unary=self._unary(handler.unary_unary, method, admin_only)
            )
        if handler.unary_stream is not None:
            return handler._replace(
                unary_stream=self._unary_stream(handler.unary_stream, method, admin_only)
            )
        # TokenFlowService has no client-streaming method. One added later
        # fails as an unknown method (UNIMPLEMENTED) until its kind is wrapped here.
        return None

    def authorize(self, context: Any, method: str, admin_only: bool) -> ApiKey:
        """Return the call's key; raise UnauthenticatedError or PermissionDeniedError."""
        try:
            key = self.store.find(presented_secret(context.invocation_metadata() or ()))
            if key is None:
                raise UnauthenticatedError("invalid API key")
            if admin_only and not key.is_admin:
                raise PermissionDeniedError(
                    f"{method.rsplit('/', 1)[-1]} needs an API key with the admin role; "
                    f"key {key.id!r} has the role {key.role!r}"
                )
        except TokenFlowError as error:
            # The message never contains the key itself.
            self._warnings.warning(
                f"rejected {type(error).__name__}",
                "rejected a call to %s from %s: %s",
                method,
                context.peer(),
                error,
            )
            raise
        return key

    def _unary(self, behavior: Any, method: str, admin_only: bool) -> Any:
        async def authorized(request: Any, context: Any) -> Any:
            try:
                key = self.authorize(context, method, admin_only)
            except TokenFlowError as error:
                await _abort(context, error)
            token = _current_key.set(key)
            try:
                return await behavior(request, context)
            finally:
                _current_key.reset(token)

        return authorized

    def _unary_stream(self, behavior: Any, method: str, admin_only: bool) -> Any:
        async def authorized(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                key = self.authorize(context, method, admin_only)
            except TokenFlowError as error:
                await _abort(context, error)
            # The variable is set in the task that iterates this generator,
            # which is the task that runs the servicer's generator below.
            _current_key.set(key)
            async for response in behavior(request, context):
                yield response

        return authorized


async def _abort(context: Any, error: TokenFlowError) -> NoReturn:
    code, message, metadata = to_status(error)
    await context.abort(code, message, trailing_metadata=tuple(metadata))
    raise AssertionError("context.abort returned")  # abort always raises
