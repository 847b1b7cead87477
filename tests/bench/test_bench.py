"""`python -m bench` end to end on the tiny model, briefly: it must keep producing its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.serving import Row, apply_limit, best_config, run
from bench.workload import MIXES, build_requests, load_prompts


def _raw(batch: int, spinning: bool, windows_per_s: float, cpu: float | None = 10.0) -> Row:
    return Row(
        "raw", None, batch, 0.0, 1.0, 1.0, 1.0, spinning=spinning, windows_per_s=windows_per_s, cpu_ms_per_window=cpu
    )


def test_best_config_is_the_most_windows_per_second_whatever_the_batch() -> None:
    peak = _raw(8, True, 122.7)
    rows = [_raw(1, True, 80.0), _raw(1, False, 60.0), peak, _raw(8, False, 100.0), _raw(64, True, 90.0)]
    # request by request and service rows are never the limit, however fast
    rows += [
        Row("raw", 1, 1.0, 0, 1, 1, 1, windows_per_s=500.0),
        Row("service", 64, 24.0, 0, 1, 1, 1, windows_per_s=900),
    ]
    assert best_config(rows) is peak
    # a tie goes to the configuration spending less CPU per window
    thrifty = _raw(16, False, 122.7, cpu=8.0)
    assert best_config([*rows, thrifty]) is thrifty
    with pytest.raises(ValueError):
        best_config([Row("service", 1, 1.0, 0, 1, 1, 1, windows_per_s=10.0)])


def test_apply_limit_fills_both_ratios_against_the_limit() -> None:
    limit = _raw(8, True, 100.0, cpu=20.0)
    service = Row("service", 64, 24.0, 0, 1, 1, 1, windows_per_s=85.0, cpu_ms_per_window=25.0)
    other = _raw(32, False, 50.0, cpu=None)
    apply_limit([limit, service, other], limit)
    assert (limit.pct_of_limit, limit.pct_of_limit_cpu, limit.limit) == (100.0, 100.0, True)
    assert service.pct_of_limit == pytest.approx(85.0) and service.pct_of_limit_cpu == pytest.approx(80.0)
    assert other.pct_of_limit == pytest.approx(50.0) and other.pct_of_limit_cpu is None and not other.limit


def test_short_mix_keeps_5_to_60_words_from_the_same_files(tmp_path: Path) -> None:
    texts = ["hi", "five words are right here", " ".join(["w"] * 60), " ".join(["w"] * 61), "x " * 300]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n", encoding="utf-8")
    lo, hi = MIXES["short"]
    short = load_prompts(folder=tmp_path, min_words=lo, max_words=hi)
    assert sorted(len(t.split()) for t in short) == [5, 60]
    assert len(load_prompts(folder=tmp_path)) == len(texts)
    reqs = build_requests(20, folder=tmp_path, mix="short")
    assert len(reqs) == 20 and all(5 <= len(r["prompt"].split()) <= 60 for r in reqs)
    with pytest.raises(ValueError):
        build_requests(5, folder=tmp_path, mix="medium")


def test_bench_runs_raw_and_service_and_compares_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = run(
        tiny_model_dir,
        concurrency=(1, 4),
        seconds=1.0,
        warmup=0.3,
        raw_seconds=0.1,
        raw_batches=(1, 4, 16),
        mixes=("short", "long"),
        threads=1,
        n_requests=40,
        max_chars=500,
        log_dir=tmp_path,
        progress=False,
    )
    assert set(report.limits) == {"short", "long"}
    for mix, limit in report.limits.items():
        rows = [r for r in report.rows if r.mix == mix]
        raw = [r for r in rows if r.mode == "raw"]
        sweep = [r for r in raw if r.clients is None]
        service = {r.clients: r for r in rows if r.mode == "service"}
        assert set(service) == {1, 4} and raw[0].note == "request by request"
        # the sweep: every batch size with spinning on and off; the limit is its best, whatever the batch
        configs = {(round(r.batch), r.spinning) for r in sweep}
        assert {(b, s) for b in (1, 4, 16) for s in (True, False)} <= configs
        assert limit in sweep and limit is best_config(sweep) and [r for r in rows if r.limit] == [limit]
        assert limit.pct_of_limit == pytest.approx(100.0) and all(r.pct_of_limit is not None for r in rows)
        assert all(r.pct_of_limit <= 100.0 + 1e-9 for r in sweep if r.pct_of_limit is not None)
        for row in service.values():
            assert row.requests > 0 and row.errors == 0 and row.rps > 0 and row.p50_ms <= row.p99_ms
            assert row.pct_of_limit is not None and row.pct_of_limit > 0 and row.batch >= 1
            assert row.pct_of_limit_cpu is not None and row.pct_of_limit_cpu > 0
            assert row.pct_of_raw_same_batch is not None and row.pct_of_raw_same_batch > 0
        # 1 client: paired with the raw request-by-request times of the same requests
        assert service[1].added_p50_ms is not None and service[1].raw_p50_ms == raw[0].p50_ms
        assert service[1].outside_model_p50_ms is not None and service[1].outside_model_p50_ms > 0
    table = report.markdown()
    assert table.count("\n") == len(report.rows) + 3 + len(report.limits)
    assert "| mix |" in table and "% of limit" in table and "% of raw at same batch" in table
    assert table.count("= limit**") == 2 and "\n- limit (short): raw onnxruntime, batch " in table
    assert all(r.cpu_ms_per_window and r.cpu_ms_per_window > 0 for r in report.rows)
    assert set(json.loads(report.to_json())["limits"]) == {"short", "long"}


def test_bench_drives_the_moderation_route_with_the_same_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = run(
        tiny_model_dir,
        concurrency=(2,),
        seconds=1.0,
        warmup=0.3,
        raw_seconds=0.1,
        raw_batches=(2,),
        mixes=("short",),
        threads=1,
        n_requests=40,
        log_dir=tmp_path,
        progress=False,
        routes=("classify", "moderations"),
    )
    service = [r for r in report.rows if r.mode == "service"]
    assert [r.note for r in service] == ["/v1/classify", "/v1/moderations"]
    for row in service:
        assert row.requests > 0 and row.errors == 0 and row.windows_per_s > 0 and row.pct_of_limit is not None
    assert "2 clients /v1/moderations: " in report.markdown()
    assert json.loads(report.to_json())["settings"]["routes"] == ["classify", "moderations"]


def test_cli_rejects_a_folder_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "not a model folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [["--mix", "medium"], ["--mix", ""], ["--raw-batches", "0,8"], ["--raw-batches", "x"], ["--routes", "chat"]],
)
def test_cli_rejects_bad_mix_and_batches(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model-dir", str(tmp_path), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert ("--mix" in err or "--raw-batches" in err or "--routes" in err) and "not a model folder" not in err
