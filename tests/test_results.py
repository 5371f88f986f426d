"""bullet_kernels.results: file naming, the schema check, and writing a run (on this machine)."""

from __future__ import annotations

import json

import pytest

from bullet_kernels import results


@pytest.mark.parametrize("device, slug", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA L40S", "l40s"),
    ("none (torch.cuda.is_available() is False)", "cpu"),
])
def test_gpu_slug(device, slug):
    assert results.gpu_slug(device) == slug


def test_result_path_names_benchmark_gpu_and_utc_day(tmp_path):
    path = results.result_path("sm-sweep", "NVIDIA H200", "2026-12-01T23:59:00+00:00", tmp_path)
    assert path == tmp_path / "sm-sweep-h200-20261201.json"


@pytest.mark.parametrize("name", ["Decode", "decode run", "../decode", "", "-x"])
def test_bad_benchmark_names_are_refused(name):
    with pytest.raises(ValueError, match="lower-case"):
        results.check_name(name)
    with pytest.raises(ValueError, match="lower-case"):
        results.Recorder(name)


def good_doc() -> dict:
    return {"benchmark": "decode", "device": "NVIDIA H200", "sms": 132, "driver": "580 (CUDA 13.0)",
            "torch": "2.11.0", "commit": "abc", "timestamp": "2026-12-01T00:00:00+00:00", "command": "pytest bench/",
            "rows": [{"median_ms": 1.0}], "summary": {}}


def test_validate_accepts_the_schema():
    results.validate(good_doc())


def test_validate_names_every_problem():
    doc = good_doc()
    del doc["commit"]
    doc["sms"] = True  # a bool is not an SM count
    doc["rows"] = [{"ok": 1}, "not a row"]
    doc["summary"] = []
    with pytest.raises(ValueError) as exc:
        results.validate(doc)
    text = str(exc.value)
    for part in ("missing 'commit'", "'sms' must be int", "rows[1] must be a dict", "'summary' must be dict"):
        assert part in text


def test_write_then_read_back(tmp_path):
    rows = [{"kind": "copy", "median_ms": 0.5, "samples_ms": [0.5, 0.6]}]
    path = results.write("unit-test", rows, {"headline": 1.5}, tmp_path, model="tiny")
    doc = json.loads(path.read_text())
    results.validate(doc)
    assert path.name.startswith(f"unit-test-{results.gpu_slug(doc['device'])}-")
    assert path == results.result_path("unit-test", doc["device"], doc["timestamp"], tmp_path)
    assert doc["rows"] == rows and doc["summary"] == {"headline": 1.5} and doc["model"] == "tiny"


def test_recorder_collects_rows_and_run_facts(tmp_path):
    rec = results.Recorder("unit-test", tmp_path, backend="green")
    assert rec.add({"a": 1}) == {"a": 1}
    with pytest.raises(TypeError, match="dict"):
        rec.add([1, 2])
    doc = json.loads(rec.write({"s": 2}, size="quick").read_text())
    assert doc["rows"] == [{"a": 1}] and doc["backend"] == "green" and doc["size"] == "quick"


def test_environment_commit_can_be_stamped(monkeypatch):
    monkeypatch.setenv("BULLET_COMMIT", "deadbeef (copy without .git)")
    env = results.environment()
    assert env["commit"] == "deadbeef (copy without .git)"
    assert isinstance(env["sms"], int) and env["torch"]


def test_compact_results_read_back_the_same(tmp_path):
    rows = [{"rate": 8.0, "results": [{"token_times_s": [0.1, 0.2, 0.3]}]}, {"rate": 12.0, "results": []}]
    path = results.write("serving-x", rows, {"goodput": 8.0}, tmp_path, compact=True, url="http://h")
    text = path.read_text()
    doc = json.loads(text)
    assert doc["rows"] == rows and doc["summary"] == {"goodput": 8.0} and doc["url"] == "http://h"
    assert len(text.splitlines()) < 40  # one line per row, not one per number
