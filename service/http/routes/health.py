"""Liveness and readiness probes.

/healthz is 200 whenever the process answers; /readyz is 200 only once the model is loaded
and warmed up, else 503 with the reason (loading, load error, shutting down). Both answer
HEAD with the same status and no body. Probes are
not counted as errors in metrics: they are polled constantly.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.core.errors import ErrorCode
from service.http.deps import RuntimeDep
from service.http.errors import error_response
from service.http.openapi import error_responses
from service.http.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


# HEAD too (load balancers and uptime checkers probe with it); kept out of the schema, where
# it would only repeat GET.
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.head("/readyz", include_in_schema=False, response_model=ReadyResponse)
@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses=error_responses(
        ErrorCode.not_ready, notes={ErrorCode.not_ready: "loading, load error, or shutting down; message says which"}
    ),
)
async def readyz(runtime: RuntimeDep) -> ReadyResponse | JSONResponse:
    if not runtime.ready or runtime.engine is None:
        return error_response(ErrorCode.not_ready, runtime.not_ready_reason or "not ready")
    return ReadyResponse(model=runtime.engine.model_id)
