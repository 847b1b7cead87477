"""Calibrated scores and threshold overrides, as the service applies them."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.config import Settings
from service.contract.policy import Policy, pad_batch
from service.http.app import create_app
from service.model.calibration import Calibration, apply_calibration, logit, sigmoid
from service.model.onnx_model import ModelLoadError, OnnxModel
from tests.service.conftest import running_engine


def with_calibration(src: Path, dst: Path, calibration: dict | None) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["calibration"] = calibration
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_temperature_scaling_is_increasing_and_bounded() -> None:
    p = np.array([0.0, 1e-9, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0], dtype=np.float32)
    for t in (0.5, 1.0, 2.0, 5.0):
        q = Calibration(temperature=t).apply(p)
        assert np.all(np.diff(q) >= 0) and np.all((q > 0) & (q < 1))
        assert q[4] == pytest.approx(0.5)
    np.testing.assert_allclose(Calibration(temperature=1.0).apply(p[2:-2]), p[2:-2], rtol=1e-5)
    # T > 1 softens: every score moves toward 0.5
    soft = Calibration(temperature=2.0).apply(p[1:-1])
    assert np.all(np.abs(soft - 0.5) <= np.abs(p[1:-1] - 0.5) + 1e-9)
    assert apply_calibration(None, 0.3) == pytest.approx(0.3)
    np.testing.assert_allclose(sigmoid(logit(np.array([0.2, 0.8]))), [0.2, 0.8])


@pytest.mark.parametrize(
    "bad",
    [{"method": "temperature", "temperature": 0}, {"method": "isotonic", "temperature": 1.0}, {"temperature": -1}],
)
def test_a_bad_calibration_refuses_the_folder(tiny_model_dir: Path, tmp_path: Path, bad: dict) -> None:
    folder = with_calibration(tiny_model_dir, tmp_path / "m", bad)
    with pytest.raises(ModelLoadError, match=r"manifest\.json is invalid"):
        OnnxModel.load(folder)


def test_the_engine_answers_calibrated_scores(
    tiny_model_dir: Path, tmp_path: Path, shipped_policies: dict[str, Policy]
) -> None:
    folder = with_calibration(tiny_model_dir, tmp_path / "m", {"method": "temperature", "temperature": 0.05})
    model = OnnxModel.load(folder, threads=1)
    policy = shipped_policies["toxicity"]
    prompt = "What is the capital of France?"
    w = model.encoder.encode(policy, prompt)
    raw = float(
        np.max(
            model.run(pad_batch(w.input_ids, model.pad_id), pad_batch(w.attention_mask), pad_batch(w.token_type_ids))
        )
    )

    async def main() -> float:
        async with running_engine(model, shipped_policies) as engine:
            return (await engine.classify([policy], prompt)).verdicts[0].score

    served = asyncio.run(main())
    assert served == pytest.approx(float(sigmoid(logit(raw) / 0.05)), abs=1e-3)
    assert abs(served - raw) > 0.01  # the calibration visibly applied (raw is ~0.4985)


def test_threshold_overrides_from_settings(
    tiny_model: OnnxModel, shipped_policies: dict[str, Policy], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNIGUARD_THRESHOLDS", '{"toxicity": 0.7, "tax_advice": 0}')
    assert Settings().thresholds == {"toxicity": 0.7, "tax_advice": 0.0}
    monkeypatch.setenv("UNIGUARD_THRESHOLDS", '{"toxicity": 1.5}')
    with pytest.raises(Exception, match="less than or equal to 1"):
        Settings()

    async def main() -> None:
        async with running_engine(
            tiny_model, shipped_policies, thresholds={"toxicity": 0.7, "tax_advice": 0.0}
        ) as engine:
            tox = shipped_policies["toxicity"]
            assert engine.threshold_info(tox) == (0.7, True, "config")
            assert engine.threshold_info(shipped_policies["prompt_injection"]) == (0.5, True, "manifest")
            # An inline policy that borrows a served id but not its text is zero-shot, not overridden.
            impostor = Policy(id="toxicity", name="x", description="Block questions about geography.")
            assert engine.threshold_info(impostor) == (0.5, False, "default")
            verdict = (await engine.classify([shipped_policies["tax_advice"]], "hello")).verdicts[0]
            assert verdict.threshold == 0.0 and verdict.unsafe  # threshold 0 flags everything

    asyncio.run(main())


def test_policies_route_shows_where_each_threshold_comes_from(tiny_model_dir: Path) -> None:
    async def main() -> dict:
        app = create_app(Settings(model_dir=tiny_model_dir, threads=1, thresholds={"toxicity": 0.7}))
        await app.state.runtime.load()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = (await c.get("/v1/policies")).json()
        await app.state.runtime.shutdown()
        return {p["id"]: p for p in body["policies"]}

    policies = asyncio.run(main())
    assert (policies["toxicity"]["threshold"], policies["toxicity"]["threshold_source"]) == (0.7, "config")
    assert policies["prompt_injection"]["threshold_source"] == "manifest"
