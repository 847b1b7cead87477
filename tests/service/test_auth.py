"""Optional API key: the middleware on its own, then the real service with a key and an upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.config import Settings
from service.http.auth import ApiKeyMiddleware, open_paths
from tests.harness.live_server import Server, assert_error
from tests.harness.upstream import UpstreamServer
from tests.service.sidecar import MIXED, chat, model_with_thresholds, post_json, servers

KEY = "guard-key-3f9a"
UPSTREAM_KEY = "upstream-key-77c1"


# -- the middleware -------------------------------------------------------------------------


class _App:
    """ApiKeyMiddleware around a tiny app that echoes which headers carried the key."""

    def __init__(self, metrics_public: bool = False) -> None:
        async def echo(request: Request) -> JSONResponse:
            return JSONResponse({"auth_headers": request.scope.get("state", {}).get("auth_headers")})

        paths = ["/healthz", "/readyz", "/metrics", "/v1/classify"]
        inner = Starlette(routes=[Route(p, echo, methods=["GET", "POST"]) for p in paths])
        self.app = ApiKeyMiddleware(inner, api_key=KEY, open_paths=open_paths(metrics_public))

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        async def main() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t") as c:
                return await c.request(method, path, headers=headers)

        return asyncio.run(main())

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("GET", path, headers)

    def post(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("POST", path, headers)


def _app(metrics_public: bool = False) -> _App:
    return _App(metrics_public)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Basic {KEY}"},
        {"authorization": KEY},
        {"x-api-key": "wrong"},
        {"authorization": f"Bearer {KEY}x"},
        {"authorization": f"Bearer {KEY[:-1]}"},
    ],
)
def test_missing_or_wrong_key_is_401(headers: dict[str, str]) -> None:
    r = _app().post("/v1/classify", headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "unauthorized" and set(r.json()["error"]) == {"code", "message", "details"}


@pytest.mark.parametrize(
    ("headers", "via"),
    [
        ({"authorization": f"Bearer {KEY}"}, ["authorization"]),
        ({"authorization": f"bearer  {KEY} "}, ["authorization"]),
        ({"x-api-key": KEY}, ["x-api-key"]),
        ({"authorization": "Bearer for-the-upstream", "x-api-key": KEY}, ["x-api-key"]),
        ({"authorization": f"Bearer {KEY}", "x-api-key": KEY}, ["authorization", "x-api-key"]),
    ],
)
def test_right_key_passes_and_says_which_headers(headers: dict[str, str], via: list[str]) -> None:
    r = _app().post("/v1/classify", headers=headers)
    assert r.status_code == 200 and r.json() == {"auth_headers": via}


def test_open_paths_and_metrics() -> None:
    c = _app()
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert _app(metrics_public=True).get("/metrics").status_code == 200


def test_empty_key_setting_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIGUARD_API_KEY", "  ")
    with pytest.raises(ValidationError):
        Settings()


# -- the real service -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamServer
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("auth")
    env = {
        "UNIGUARD_MODEL_DIR": str(model_with_thresholds(tiny_model_dir, tmp / "mixed", MIXED)),
        "UNIGUARD_API_KEY": KEY,
        "UNIGUARD_UPSTREAM_BASE_URL": upstream.base_url,
        "UNIGUARD_UPSTREAM_API_KEY": UPSTREAM_KEY,
    }
    with servers(tmp, {"auth": env}) as out:
        yield out["auth"]


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


GOOD = {"authorization": f"Bearer {KEY}"}


def test_health_routes_are_open(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/classify", {"policy_id": "toxicity", "prompt": "hi"}),
        ("GET", "/v1/policies", None),
        ("GET", "/metrics", None),
        ("POST", "/beta/litellm_basic_guardrail_api", {"texts": ["hi"]}),
        ("GET", "/openapi.json", None),
    ],
)
def test_routes_need_the_key(client: httpx.Client, method: str, path: str, body: object) -> None:
    # json=None sends no body
    assert_error(client.request(method, path, json=body), 401, "unauthorized")
    assert_error(client.request(method, path, headers={"authorization": "Bearer nope"}, json=body), 401, "unauthorized")
    assert client.request(method, path, headers=GOOD, json=body).status_code == 200
    assert client.request(method, path, headers={"x-api-key": KEY}, json=body).status_code == 200


def test_unknown_paths_need_the_key_too(client: httpx.Client) -> None:
    assert_error(client.get("/v2/nothing"), 401, "unauthorized")
    assert_error(client.get("/v2/nothing", headers=GOOD), 404, "not_found")


def test_proxy_key_handling(client: httpx.Client, upstream: UpstreamServer) -> None:
    upstream.clear()
    assert_error(post_json(client, "/v1/chat/completions", chat()), 401, "unauthorized")
    assert upstream.records == []  # refused before anything is read or forwarded
    raw = json.dumps(chat("hello")).encode()
    r = client.post(
        "/v1/chat/completions", content=raw, headers={**GOOD, "content-type": "application/json", "x-api-key": KEY}
    )
    assert r.status_code == 200, r.text
    (rec,) = upstream.records
    assert rec.body == raw
    # The upstream gets its own key, never UniGuard's (neither header that may carry it).
    assert [v for k, v in rec.headers if k == "authorization"] == [f"Bearer {UPSTREAM_KEY}"]
    assert not any(KEY in v for _, v in rec.headers)
