"""SGLang 0.5.15's own benchmark client, in our driver's one long-lived client process
(serve/sglang_bench_runner.py, run by the python of .venv-sglang as on the GPU machine it runs
with SGLang's wheel set), against our real server on loopback (tiny random Llama, CPU): two runs in
one process send the same seeded requests, and what SGLang writes reads back as our rows.
Shorter requests than the standard trace's (tiny-llama3 holds 512 positions): the driver's
arguments with the two lengths changed. Skipped where .venv-sglang does not exist (.ci/run makes
it: scripts/sglang_cpu_env.sh)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from bullet_kernels.models.presets import write_model_dir
from bullet_kernels.serve import server, sglang_driver
from bullet_kernels.serve.app import ServeOptions, build_service
from test_sglang_real_env import PYTHON, VENV


def short(args: list[str]) -> list[str]:
    """The driver's arguments with prompts of 16-32 and outputs of 4-8 tokens."""
    out = list(args)
    out[out.index("--random-input-len") + 1] = "32"
    out[out.index("--random-output-len") + 1] = "8"
    return out


@pytest.mark.slow
@pytest.mark.skipif(not PYTHON.exists(), reason=f"no SGLang environment at {VENV}: bash scripts/sglang_cpu_env.sh")
def test_sglangs_client_runs_twice_in_one_process_and_reads_back_as_our_rows(tmp_path):
    model_dir = str(write_model_dir("llama-3.1-8b", tmp_path / "client", pad_vocab=False))
    files = [tmp_path / f"run{i}.jsonl" for i in range(2)]

    def drive(url: str) -> int:
        with sglang_driver.BenchServingClient(python=str(PYTHON)) as client:
            assert client.module == "sglang.benchmark.serving"
            for rate, out in zip((4.0, 8.0), files):
                client.run(short(sglang_driver.bench_serving_args(url, rate, 6, 3, model_dir, str(out))))
            return client.proc.pid

    async def main() -> int:
        svc = build_service(ServeOptions(model="tiny-llama3", mode="chunked", device="cpu", kv_pages=256,
                                         max_context=512, chunk_size=64))
        runner = await server.start(svc, port=0)
        try:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            return await asyncio.get_running_loop().run_in_executor(None, drive, url)
        finally:
            await runner.cleanup()
            svc.engine.shutdown(drain=False, timeout_s=5)

    pid = asyncio.run(main())
    records = [json.loads(f.read_text().splitlines()[-1]) for f in files]
    for key in ("input_lens", "output_lens"):  # reseeded per run: the same requests
        assert records[0][key] == records[1][key], key
    assert all(12 <= n <= 32 for n in records[0]["input_lens"]), records[0]["input_lens"]  # 16-32, less special tokens
    rows = [sglang_driver.row_of(r, ttft_slo_s=5.0, tpot_slo_s=1.0) for r in records]
    assert [r["rate"] for r in rows] == [4.0, 8.0]
    assert all(r["ok"] == 6 and r["failed"] == 0 and r["untimed"] == 0 for r in rows)
    assert all(4 <= res["output_len"] <= 8 for r in rows for res in r["results"])
    assert not os.path.exists(f"/proc/{pid}")  # the client process ended with the block
