"""`python -m bench` end to end on the tiny model, briefly: it must keep producing its table."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import main
from bench.serving import run


def test_bench_runs_raw_and_service_and_compares_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = run(
        tiny_model_dir,
        concurrency=(1, 4),
        seconds=1.0,
        warmup=0.3,
        raw_seconds=0.4,
        threads=1,
        n_requests=50,
        max_chars=500,
        log_dir=tmp_path,
        progress=False,
    )
    raw = [r for r in report.rows if r.mode == "raw"]
    service = {r.clients: r for r in report.rows if r.mode == "service"}
    assert set(service) == {1, 4} and raw[0].note == "request by request"
    assert {1, 8, 32} <= {round(r.batch) for r in raw if r.clients is None}
    for row in service.values():
        assert row.requests > 0 and row.errors == 0 and row.rps > 0 and row.p50_ms <= row.p99_ms
        assert row.pct_of_raw is not None and row.pct_of_raw > 0 and row.batch >= 1
    assert service[1].added_p50_ms is not None  # paired with the raw request-by-request times
    assert service[1].outside_model_p50_ms is not None and service[1].outside_model_p50_ms > 0
    table = report.markdown()
    assert table.count("\n") == len(report.rows) + 2 and "% of raw at same batch" in table
    assert all(r.cpu_ms_per_window and r.cpu_ms_per_window > 0 for r in report.rows)
    assert all(r.pct_of_raw_cpu for r in service.values())


def test_cli_rejects_a_folder_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        main(["--model-dir", str(tmp_path)])
    except SystemExit as exc:
        assert exc.code == 2
    assert "not a model folder" in capsys.readouterr().err
