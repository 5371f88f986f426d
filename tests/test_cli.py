"""The `bullet` command line as a new user meets it: help, argument checks before any GPU work,
clear errors with exit status 2, and the main job (`bullet bench`) on a machine without a GPU."""

from __future__ import annotations

import argparse
import json
import types

import pytest

import bullet_kernels.cli as cli
import bullet_kernels.sweep
from bullet_kernels.errors import InvalidSplitError, UnsupportedError
from bullet_kernels.models.presets import PRESETS
from bullet_kernels.partition import BACKENDS, SMSplit, get_backend


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``bullet argv...``: (exit status, stdout, stderr), whether main returns or exits."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_gpu(monkeypatch):
    """This process sees no GPU (also on the GPU machine), so these tests never start GPU work."""
    monkeypatch.setattr(cli, "describe_state", lambda index=0: (None, "no GPU in this test"))


@pytest.fixture
def gpu_untouched(monkeypatch):
    """Fails the test if the command gets as far as asking for the GPU."""

    def refuse(index=0):
        raise AssertionError("the GPU was checked before the arguments")

    monkeypatch.setattr(cli, "describe_state", refuse)


@pytest.fixture
def sweep_calls(monkeypatch) -> list[argparse.Namespace]:
    """Records what `bullet sweep`'s implementation would get, instead of measuring."""
    calls: list[argparse.Namespace] = []

    def record(args):
        calls.append(args)
        return 0

    monkeypatch.setattr(bullet_kernels.sweep, "main", record)
    return calls


# -- help ------------------------------------------------------------------------------------------


def test_top_level_help_shows_the_whole_description(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for line in cli.__doc__.strip().splitlines():
        assert line.rstrip() in out  # as written: no re-wrapping
    for command in ("info", "bench", "sweep"):
        assert f"bullet {command}" in out


@pytest.mark.parametrize("command", ["info", "bench", "profile", "sweep"])
def test_every_option_has_help_with_its_default_and_choices(capsys, command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split()).replace("- ", "-")  # argparse wraps help text, also after hyphens
    assert "SUPPRESS" not in text
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help text"
        if action.default is argparse.SUPPRESS:  # no default value: the help says what happens instead
            assert "default" in action.help.lower() or "without it" in action.help
        else:
            assert f"(default: {action.default})" in text, f"{command} {action.option_strings[0]} hides its default"
    if command != "info":
        assert "{" + ",".join(BACKENDS) + "}" in text
        assert all(name in text for name in PRESETS)


# -- bad arguments: exit 2 with what is allowed, before any GPU check ------------------------------


@pytest.mark.parametrize("text", ["prefill=96,prefill=10", "prefill=abc", "prefill=0", "Decode=8"])
def test_bad_split_exits_2_with_the_split_error(capsys, gpu_untouched, text):
    with pytest.raises(InvalidSplitError) as expected:
        SMSplit.parse(text)
    code, _, err = run(capsys, "info", "--split", text)
    assert code == 2
    assert str(expected.value) in err


@pytest.mark.parametrize("command", ["sweep", "bench"])
def test_unknown_preset_and_backend_name_the_allowed_values(capsys, gpu_untouched, command):
    code, _, err = run(capsys, command, "--preset", "llama-9")
    assert code == 2 and "llama-9" in err
    assert all(name in err for name in PRESETS)
    code, _, err = run(capsys, command, "--backend", "mps")
    assert code == 2 and "mps" in err
    assert all(name in err for name in BACKENDS)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--prompt", "0"], ["--prompt", "'0'", "at least 1"]),
        (["--prompt", "many"], ["--prompt", "'many'"]),
        (["--decode-batch", "32", "-4"], ["--decode-batch", "'-4'"]),
        (["--context", "0"], ["--context"]),
        (["--reps", "1.5"], ["--reps", "'1.5'"]),
        (["--groups", "33"], ["--groups 33", "32 layers"]),
        (["--prompt", "200000"], ["200000", "131072"]),
        (["--preset", "tiny-tied", "--groups", "4"], ["3 layers"]),
    ],
)
def test_bad_sweep_numbers_exit_2_naming_the_option(capsys, gpu_untouched, argv, words):
    code, _, err = run(capsys, "sweep", *argv)
    assert code == 2
    assert all(w in err for w in words), err


def test_info_device_must_be_an_index(capsys, gpu_untouched):
    code, _, err = run(capsys, "info", "--device", "-1")
    assert code == 2 and "GPU index" in err


def test_no_command_exits_2_with_the_commands(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "{info,bench,profile,sweep,serve,bench-serving}" in err


def test_serve_options_reach_the_scheduler_and_bad_ones_exit_2(capsys, monkeypatch):
    from bullet_kernels.cli import build_parser
    from bullet_kernels.serve import app, commands

    args = build_parser().parse_args(["serve", "--model", "tiny-llama3", "--max-prefill-tokens", "4096", "--no-overlap"])
    seen = {}

    class Built(Exception):
        pass

    def build_service(opts):
        seen["opts"] = opts
        raise Built  # stop before a model is built

    monkeypatch.setattr(app, "build_service", build_service)
    with pytest.raises(Built):
        commands.serve_main(args)
    assert seen["opts"].max_prefill_tokens == 4096 and seen["opts"].overlap is False
    assert build_parser().parse_args(["serve", "--model", "tiny-llama3"]).overlap is True  # the default
    code, _, err = run(capsys, "serve", "--model", "tiny-llama3", "--max-prefill-tokens", "0")
    assert code == 2 and "--max-prefill-tokens" in err


# -- output paths ----------------------------------------------------------------------------------


def test_json_into_a_missing_folder_is_refused_before_the_gpu(capsys, gpu_untouched, tmp_path):
    target = tmp_path / "missing" / "info.json"
    code, _, err = run(capsys, "info", "--json", str(target))
    assert code == 2
    assert "does not exist" in err and str(target.parent) in err
    assert "Traceback" not in err and not target.parent.exists()


def test_json_onto_a_folder_is_refused(capsys, gpu_untouched, tmp_path):
    code, _, err = run(capsys, "info", "--json", str(tmp_path))
    assert code == 2 and "is a folder" in err


def test_out_below_a_file_is_refused(capsys, gpu_untouched, tmp_path):
    (tmp_path / "results").write_text("")
    code, _, err = run(capsys, "sweep", "--out", str(tmp_path / "results" / "h200"))
    assert code == 2 and "is a file" in err


def test_out_may_be_a_new_folder(capsys, sweep_calls, tmp_path):
    out = tmp_path / "new" / "results"
    code, _, _ = run(capsys, "sweep", "--quick", "--out", str(out))
    assert code == 0 and sweep_calls[0].out == str(out)


# -- bullet info -----------------------------------------------------------------------------------


def test_info_without_a_gpu_reports_and_writes_json(capsys, no_gpu, tmp_path):
    target = tmp_path / "info.json"
    code, out, _ = run(capsys, "info", "--json", str(target))
    assert code == 0
    assert "GPU: none (no GPU in this test)" in out and "native TPC-mask library:" in out
    report = json.loads(target.read_text())
    assert report["device"] is None and report["no_gpu_reason"] == "no GPU in this test"
    assert set(report["backends"]) == set(BACKENDS) and report["partitions"] == []
    # the none backend runs anywhere and says how it restricts lanes
    describe = getattr(get_backend("none"), "describe", lambda: "")()
    assert report["mechanisms"]["none"] == describe
    assert ("  none   available" + (f": {describe}" if describe else "")) in out.splitlines()


def test_info_asks_each_available_backend_for_its_mechanism_defensively(capsys, no_gpu, monkeypatch):
    import bullet_kernels.partition as partition

    monkeypatch.setattr(partition, "available_backends", lambda device: {"green": "", "tpc": "", "none": "no"})
    answers = {
        "green": types.SimpleNamespace(describe=lambda: "one green context per lane"),
        "tpc": types.SimpleNamespace(),  # a backend without describe()
    }

    def fake_get_backend(name, index=0):
        if name == "none":
            raise AssertionError("an unavailable backend was asked")
        return answers[name]

    monkeypatch.setattr(partition, "get_backend", fake_get_backend)
    code, out, _ = run(capsys, "info")
    assert code == 0
    lines = out.splitlines()
    assert "  green  available: one green context per lane" in lines
    assert "  tpc    available" in lines
    assert "  none   unavailable: no" in lines

    def refusing(name, index=0):
        raise UnsupportedError("driver too old")

    monkeypatch.setattr(partition, "get_backend", refusing)
    code, out, _ = run(capsys, "info")
    assert code == 0 and "  green  available: (cannot describe: driver too old)" in out.splitlines()


# -- bullet bench and bullet sweep -----------------------------------------------------------------


def test_bench_without_a_gpu_simulates_on_the_shipped_profile_and_exits_0(capsys, no_gpu, sweep_calls, tmp_path):
    code, out, _ = run(capsys, "bench", "--out", str(tmp_path))
    assert code == 0
    assert not sweep_calls, "nothing may be measured without a GPU"
    assert "GPU: none (no GPU in this test)" in out and "backends:" in out  # the device report
    assert "SIMULATION" in out and "graphs/h200/llama-3.1-8b.json" in out
    assert "mix A: 4096-token prompt beside 6 decode steps of batch 128 at context 2048" in out
    assert "mix B: 2048-token prompt beside 6 decode steps of batch 32 at context 1024" in out
    (result,) = tmp_path.glob("colocation-simulated-cpu-*.json")
    doc = json.loads(result.read_text())
    assert doc["simulated"] is True and all(r["simulated"] for r in doc["rows"])
    modes = {r["mode"] for r in doc["rows"]}
    assert {"sequential", "orchestrated"} <= modes and not any(m.startswith("chunked") for m in modes)
    assert {"A", "B"} <= set(doc["summary"])


def test_bench_sweep_adds_the_sweep_mixes(capsys, no_gpu, tmp_path):
    code, out, _ = run(capsys, "bench", "--mix", "B", "--sweep", "--out", str(tmp_path))
    assert code == 0 and "mix p4096-b128-c2048: 4096-token prompt" in out
    (result,) = tmp_path.glob("colocation-simulated-cpu-*.json")
    assert len({r["mix"] for r in json.loads(result.read_text())["rows"]}) == 7


def test_bench_refuses_a_profile_of_another_gpu_before_any_gpu_work(capsys, monkeypatch):
    device = types.SimpleNamespace(name="NVIDIA A100-SXM4-80GB", sm_count=108)
    monkeypatch.setattr(cli, "describe_state", lambda index=0: (device, ""))
    code, _, err = run(capsys, "bench", "--profile", "graphs/h200/llama-3.1-8b.json")
    assert code == 2
    assert "NVIDIA H200" in err and "NVIDIA A100" in err and "bullet profile --model llama-3.1-8b" in err


def test_bench_without_a_profile_names_the_command_that_makes_one(capsys, no_gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("BULLET_GRAPHS_DIR", str(tmp_path))
    code, _, err = run(capsys, "bench", "--out", str(tmp_path))
    assert code == 2 and "bullet profile --model llama-3.1-8b" in err


@pytest.mark.parametrize("split", ["prefill=100", "prefill=100,decode=24,spare=8", "main=64,decode=68"])
def test_bench_refuses_a_split_without_exactly_prefill_and_decode_lanes(capsys, gpu_untouched, split):
    code, _, err = run(capsys, "bench", "--split", split)
    assert code == 2 and "'prefill' and 'decode'" in err


def test_profile_without_a_gpu_says_so_and_exits_1(capsys, no_gpu):
    code, out, _ = run(capsys, "profile", "--model", "qwen3-8b")
    assert code == 1 and "no GPU" in out and "graphs/" in out


def test_sweep_passes_every_option_by_name(capsys, sweep_calls):
    argv = ["sweep", "--preset", "qwen3-8b", "--backend", "none", "--prompt", "512", "--decode-batch", "1", "8",
            "--context", "256", "--groups", "2", "--reps", "3"]
    code, _, _ = run(capsys, *argv)
    assert code == 0
    args = sweep_calls[0]
    assert (args.preset, args.backend, args.quick, args.out) == ("qwen3-8b", "none", False, "bench/results")
    assert (args.prompt, args.decode_batch, args.context, args.groups, args.reps) == (512, [1, 8], 256, 2, 3)


def test_refusals_from_the_library_exit_2_with_the_reason(capsys, monkeypatch):
    def refuse(args):
        raise UnsupportedError("partition backend 'tpc' is unavailable: no GPU; usable here: none")

    monkeypatch.setattr(bullet_kernels.sweep, "main", refuse)
    code, _, err = run(capsys, "sweep")
    assert code == 2
    assert err.strip() == "bullet sweep: error: partition backend 'tpc' is unavailable: no GPU; usable here: none"
