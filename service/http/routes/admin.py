"""POST /admin/reload: pick up a new model folder and policy files without a restart.

Who may call it:

* ``UNIGUARD_API_KEY`` set (and ``UNIGUARD_ADMIN_ENABLED`` not false): callers with the key
  (the API-key middleware checks it, like every other route);
* no API key and ``UNIGUARD_ADMIN_ENABLED=true``: loopback clients only (the sidecar's own
  host), anyone else gets 403;
* otherwise 403 ``forbidden``: admin is off. SIGHUP reloads in every case.

The reload re-reads ``UNIGUARD_MODEL_DIR`` and ``UNIGUARD_POLICIES_DIR`` (no path comes from
the request): replace the folder's content (atomically: write a sibling, rename) and call
it. See ``service.core.runtime.Runtime.reload`` for the guarantees.
"""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter, Request

from service.config import Settings
from service.core.errors import ApiError, ErrorCode
from service.http.deps import RuntimeDep
from service.http.openapi import error_responses
from service.http.schemas import ReloadResponse

router = APIRouter(tags=["admin"])


def admin_refusal(settings: Settings, client_host: str | None) -> str | None:
    """Why this client may not use admin endpoints, or None if it may."""
    enabled = settings.admin_enabled if settings.admin_enabled is not None else settings.api_key is not None
    if not enabled:
        return (
            "admin endpoints are off: set UNIGUARD_API_KEY (the key is then required) or "
            "UNIGUARD_ADMIN_ENABLED=true (loopback clients only); SIGHUP also reloads"
        )
    if settings.api_key is None and not _is_loopback(client_host):
        return "without UNIGUARD_API_KEY, admin endpoints answer loopback clients only"
    return None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@router.post(
    "/admin/reload",
    responses=error_responses(
        ErrorCode.unauthorized,
        ErrorCode.forbidden,
        ErrorCode.reload_failed,
        notes={ErrorCode.reload_failed: "the previous model keeps serving; message and details say why"},
    ),
)
async def reload(request: Request, runtime: RuntimeDep) -> ReloadResponse:
    """Load, validate and warm up the configured model and policies beside the serving ones,
    then switch atomically. On failure the previous version keeps serving (422 reload_failed)."""
    refusal = admin_refusal(runtime.settings, request.client.host if request.client else None)
    if refusal is not None:
        raise ApiError(ErrorCode.forbidden, refusal)
    outcome = await runtime.reload(trigger="admin")
    if not outcome.ok:
        serving = outcome.model or "nothing (not ready)"
        raise ApiError(
            ErrorCode.reload_failed,
            f"reload failed, still serving {serving}: {outcome.reason}",
            {"reason": outcome.reason, "serving": outcome.model, "elapsed_ms": outcome.elapsed_ms},
        )
    assert outcome.model is not None
    return ReloadResponse(
        model=outcome.model,
        previous_model=outcome.previous_model,
        policies=outcome.policies,
        warnings=outcome.warnings,
        elapsed_ms=outcome.elapsed_ms,
    )
