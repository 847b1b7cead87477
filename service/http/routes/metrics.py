"""GET /metrics in the Prometheus text format, from this app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.core.metrics import CONTENT_TYPE
from service.http.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format",
            "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), headers={"Content-Type": CONTENT_TYPE})
