"""GET /v1/policies: what the service can judge, with each policy's threshold."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter

from service.core.errors import ErrorCode
from service.http.deps import EngineDep
from service.http.openapi import error_responses
from service.http.schemas import PoliciesResponse, PolicyOut
from service.model.manifest import SENSITIVITY_LEVELS, Sensitivity

router = APIRouter(tags=["policies"])


@router.get("/v1/policies", responses=error_responses(ErrorCode.not_ready))
async def list_policies(engine: EngineDep) -> PoliciesResponse:
    out = []
    for policy in engine.policies.values():
        threshold, trained, source = engine.threshold_info(policy)
        levels = {cast(Sensitivity, level): engine.threshold_info(policy, level)[0] for level in SENSITIVITY_LEVELS}
        out.append(
            PolicyOut(
                id=policy.id,
                name=policy.name,
                description=policy.description,
                allowed=policy.allowed,
                disallowed=policy.disallowed,
                threshold=threshold,
                sensitivity=engine.settings.sensitivity,
                thresholds=levels,
                trained=trained,
                threshold_source=source,
            )
        )
    return PoliciesResponse(model=engine.model_id, policies=out)
