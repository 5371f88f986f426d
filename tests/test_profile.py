"""bullet_kernels.orchestrate.profile: the bullet-profile/1 files of graphs/ (CPU only)."""

from __future__ import annotations

import json
import os

import pytest

from bullet_kernels.errors import BulletError
from bullet_kernels.models.presets import PRESETS, preset_config
from bullet_kernels.orchestrate import profile as P
from bullet_kernels.orchestrate.profile import (
    MissingProfile,
    Profile,
    ProfileError,
    ProfileMismatch,
)

SPLIT = "prefill96-decode36"
DEVICE = {"name": "NVIDIA H200", "uuid": "GPU-0", "sm_count": 132, "tpc_count": 66,
          "compute_capability": [9, 0], "total_memory_bytes": 150754820096, "l2_bytes": 62914560}


def new_profile(**over) -> Profile:
    args = dict(
        gpu="h200", model="llama-3.1-8b", model_config=preset_config("llama-3.1-8b"), device=dict(DEVICE),
        driver={"kernel": "580.159.04", "cuda_api": "13.0"}, software={"bullet_kernels": "0.1.0"},
        commit="abc123", command="bullet profile --model llama-3.1-8b",
        engine={"backend": "green", "page_size": 16, "layer_groups": 4},
        timing={"method": "cuda-events", "warmup": 2, "reps": 10, "statistic": "median"},
        power={"power_limit_w": 700}, grid={"decode": {"batch": [1, 8]}},
    )
    args.update(over)
    return Profile.new(**args)


def prefill_point(**over) -> dict:
    return {"tokens": 2048, "group": 0, "layers": [0, 8], "split": SPLIT, "lane": "prefill", "sms": 96,
            "ms": 13.1, "ms_p10": 13.0, "ms_p90": 13.3, "n": 10, **over}


def decode_point(**over) -> dict:
    return {"batch": 32, "context": 1024, "split": P.sm_config_name(None), "lane": "main", "sms": 132,
            "ms": 9.4, "n": 40, **over}


def corun_point(**over) -> dict:
    return {"split": SPLIT,
            "prefill": {"tokens": 2048, "group": 0, "alone_ms": 13.1, "corun_ms": 16.2, "slowdown": 1.24},
            "decode": {"batch": 32, "context": 1024, "alone_ms": 9.4, "corun_ms": 11.5, "slowdown": 1.22},
            "n": 10, **over}


def filled_profile() -> Profile:
    prof = new_profile()
    prof.add_sm_config("whole-gpu", "main", 132, 132)
    prof.add_sm_config(SPLIT, "prefill", 96, 96)
    prof.add_sm_config(SPLIT, "decode", 36, 36)
    assert prof.add_point("prefill", prefill_point())
    assert prof.add_point("decode", decode_point())
    assert prof.add_point("decode", decode_point(batch=8, ms=7.0))
    assert prof.add_point("corun", corun_point())
    return prof


def test_new_profile_is_empty_incomplete_and_valid():
    prof = new_profile()
    assert prof.doc["schema"] == P.SCHEMA == "bullet-profile/1"
    assert (prof.gpu, prof.model, prof.complete) == ("h200", "llama-3.1-8b", False)
    assert prof.prefill == prof.decode == prof.corun == prof.sm_configs == []
    assert prof.doc["created"] == prof.doc["updated"] and prof.doc["created"].endswith("+00:00")
    assert prof.model_config["hidden_size"] == 4096  # the ModelConfig was stored as its HF dict
    prof.validate()


def test_round_trip_keeps_points_and_unknown_fields(tmp_path):
    prof = filled_profile()
    prof.doc["future_field"] = {"kept": [1, 2]}
    prof.decode[0]["capture_bytes"] = 12345
    prof.complete = True
    path = prof.save(tmp_path / "h200" / "llama-3.1-8b.json")  # makes the h200/ folder
    assert path == tmp_path / "h200" / "llama-3.1-8b.json" and prof.path == path
    assert [p.name for p in path.parent.iterdir()] == ["llama-3.1-8b.json"]  # no temp file left

    back = Profile.load(path)
    assert back.doc == prof.doc
    assert back.doc["future_field"] == {"kept": [1, 2]}
    assert back.decode[0]["capture_bytes"] == 12345
    assert back.complete is True and back.path == path
    assert len(back.prefill) == 1 and len(back.decode) == 2 and len(back.corun) == 1
    assert back.sm_configs[1] == {"split": SPLIT, "lane": "prefill", "asked": 96, "granted": 96}
    assert json.loads(path.read_text())["schema"] == "bullet-profile/1"


def test_save_replaces_the_file_and_updates_the_stamp(tmp_path):
    prof = filled_profile()
    path = tmp_path / "p.json"
    prof.save(path)
    prof.doc["updated"] = "2000-01-01T00:00:00+00:00"
    prof.add_point("decode", decode_point(batch=1, ms=6.0))
    prof.save(path)
    back = Profile.load(path)
    assert len(back.decode) == 3
    assert back.doc["updated"] != "2000-01-01T00:00:00+00:00"
    assert os.stat(path).st_mode & 0o444 == 0o444  # readable, not mkstemp's 0600


def test_save_refuses_an_invalid_profile_and_keeps_the_old_file(tmp_path):
    prof = filled_profile()
    path = prof.save(tmp_path / "p.json")
    before = path.read_text()
    prof.decode[0]["ms"] = float("nan")
    with pytest.raises(ProfileError, match=r"decode\[0\] 'ms'"):
        prof.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_duplicate_point_is_refused_and_others_are_added():
    prof = filled_profile()
    assert not prof.add_point("decode", decode_point(ms=99.0))  # same axes, other time
    assert not prof.add_point("prefill", prefill_point(ms=1.0))
    assert not prof.add_point("corun", corun_point(n=3))
    assert [p["ms"] for p in prof.points("decode", batch=32)] == [9.4]
    assert prof.add_point("decode", decode_point(lane="decode", split=SPLIT, ms=9.9))  # other lane
    assert prof.add_point("corun", corun_point(decode={**corun_point()["decode"], "context": 2048}))
    assert len(prof.decode) == 3 and len(prof.corun) == 2


def test_add_point_copies_the_point():
    prof = new_profile()
    point = corun_point()
    prof.add_point("corun", point)
    point["prefill"]["tokens"] = 4096
    assert prof.corun[0]["prefill"]["tokens"] == 2048


def test_point_keys_and_has_point():
    assert Profile.point_key("prefill", prefill_point()) == (2048, 0, SPLIT, "prefill")
    assert Profile.point_key("decode", decode_point()) == (32, 1024, "whole-gpu", "main")
    assert Profile.point_key("corun", corun_point()) == (SPLIT, 2048, 0, 32, 1024)
    prof = filled_profile()
    assert prof.has_point("decode", (32, 1024, "whole-gpu", "main"))
    assert prof.has_point("decode", decode_point(ms=1.0))
    assert not prof.has_point("decode", (32, 4096, "whole-gpu", "main"))
    with pytest.raises(ProfileError, match="'context'"):
        Profile.point_key("decode", {"batch": 1, "split": "whole-gpu", "lane": "main"})


def test_unknown_grid_is_refused_with_the_grids():
    prof = new_profile()
    for call in (lambda: prof.add_point("verify", decode_point()), lambda: prof.points("verify"),
                 lambda: Profile.point_key("verify", {})):
        with pytest.raises(ValueError, match="prefill, decode, corun"):
            call()


def test_points_filters_by_fields():
    prof = filled_profile()
    assert len(prof.points("decode")) == 2
    assert [p["batch"] for p in prof.points("decode", split="whole-gpu")] == [32, 8]
    assert prof.points("decode", split="whole-gpu", batch=8)[0]["ms"] == 7.0
    assert prof.points("decode", split=SPLIT) == []
    assert prof.points("decode", no_such_field=None) == []  # absent never equals


def test_add_sm_config_is_unique_by_split_and_lane():
    prof = new_profile()
    prof.add_sm_config(SPLIT, "decode", 36, 36)
    prof.add_sm_config(SPLIT, "decode", 36, 36)
    prof.add_sm_config(SPLIT, "prefill", 96, 96)
    assert len(prof.sm_configs) == 2
    with pytest.raises(ProfileError, match="already recorded"):
        prof.add_sm_config(SPLIT, "decode", 36, 32)
    with pytest.raises(ProfileError, match="'granted'"):
        prof.add_sm_config("x", "main", 8, 0)


def test_sm_config_name():
    assert P.sm_config_name(None) == "whole-gpu"
    assert P.sm_config_name(SPLIT) == SPLIT
    with pytest.raises(ValueError):
        P.sm_config_name("")


def write_doc(tmp_path, doc) -> os.PathLike:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema="bullet-profile/2"), r"'schema' must be 'bullet-profile/1', got 'bullet-profile/2'"),
    (lambda d: d.pop("device"), r"missing top-level field 'device'"),
    (lambda d: d.update(complete="yes"), r"'complete' must be a JSON boolean"),
    (lambda d: d["decode"][0].pop("ms"), r"decode\[0\] lacks 'ms'"),
    (lambda d: d["decode"][0].update(ms=-1.0), r"decode\[0\] 'ms' must be a positive number of milliseconds, got -1.0"),
    (lambda d: d["decode"][1].update(ms=0), r"decode\[1\] 'ms' must be a positive"),
    (lambda d: d["decode"][0].update(ms="9.4"), r"decode\[0\] 'ms' must be a positive"),
    (lambda d: d["prefill"][0].pop("group"), r"prefill\[0\] lacks 'group'"),
    (lambda d: d["decode"][0].update(batch=True), r"decode\[0\] 'batch' must be an int > 0"),
    (lambda d: d["corun"][0]["decode"].pop("slowdown"), r"corun\[0\]\.decode lacks 'slowdown'"),
    (lambda d: d["corun"][0]["prefill"].update(slowdown=-0.5), r"corun\[0\]\.prefill 'slowdown' must be a positive ratio"),
    (lambda d: d["corun"][0].pop("prefill"), r"corun\[0\] 'prefill' must be a dict"),
    (lambda d: d["corun"][0].pop("split"), r"corun\[0\] lacks 'split'"),
    (lambda d: d["decode"].append(dict(d["decode"][0])), r"decode\[2\] repeats decode\[0\]"),
    (lambda d: d["sm_configs"][0].pop("granted"), r"sm_configs\[0\] 'granted'"),
    (lambda d: d.update(gpu="H200"), r"'gpu' 'H200' must be lower-case"),
])
def test_validate_names_the_broken_field(tmp_path, change, message):
    doc = json.loads(json.dumps(filled_profile().doc))
    change(doc)
    with pytest.raises(ProfileError, match=message):
        Profile(doc).validate()
    path = write_doc(tmp_path, doc)
    with pytest.raises(ProfileError, match=str(path).replace(".", r"\.")):  # load names the file
        Profile.load(path)


def test_validate_reports_every_problem_at_once():
    doc = filled_profile().doc
    doc["schema"] = "other"
    doc["decode"][0]["ms"] = -1
    with pytest.raises(ProfileError) as err:
        Profile(doc).validate()
    assert "'schema'" in str(err.value) and "decode[0] 'ms'" in str(err.value)


def test_load_refuses_bad_json_and_non_objects(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{\"schema\": ")
    with pytest.raises(ProfileError, match="broken.json is not valid JSON"):
        Profile.load(path)
    path.write_text("[]")
    with pytest.raises(ProfileError, match="JSON list"):
        Profile.load(path)
    with pytest.raises(MissingProfile, match="bullet profile --model absent"):
        Profile.load(tmp_path / "absent.json")


def test_add_point_refuses_malformed_points():
    prof = new_profile()
    with pytest.raises(ProfileError, match="lacks 'ms'"):
        prof.add_point("decode", {k: v for k, v in decode_point().items() if k != "ms"})
    with pytest.raises(ProfileError, match="'slowdown'"):
        bad = corun_point()
        del bad["decode"]["slowdown"]
        prof.add_point("corun", bad)
    with pytest.raises(ProfileError, match=r"non-finite number at decode\.power_w"):
        prof.add_point("decode", decode_point(power_w=float("nan")))
    assert prof.decode == [] and prof.corun == []


@pytest.mark.parametrize("gpu, model", [
    ("H200", "llama-3.1-8b"), ("h200", "Llama-3.1-8B"), ("h200", "../x"), ("h200", ".."),
    ("h 200", "m"), ("", "m"), ("h200", "a/b"), ("h200", ""),
])
def test_profile_path_refuses_bad_names(tmp_path, gpu, model):
    with pytest.raises(ValueError, match="lower-case letters, digits"):
        P.profile_path(gpu, model, tmp_path)


def test_profile_path_layout(tmp_path):
    assert P.profile_path("h200", "llama-3.1-8b", tmp_path) == tmp_path / "h200" / "llama-3.1-8b.json"
    assert P.profile_path("h100", "smollm2_135m", str(tmp_path)) == tmp_path / "h100" / "smollm2_135m.json"


def test_find_profile(tmp_path):
    with pytest.raises(MissingProfile) as err:
        P.find_profile("h200", "llama-3.1-8b", tmp_path)
    message = str(err.value)
    assert "bullet profile --model llama-3.1-8b" in message
    assert str(tmp_path / "h200" / "llama-3.1-8b.json") in message
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, BulletError)

    filled_profile().save(P.profile_path("h200", "qwen3-8b", tmp_path))
    with pytest.raises(MissingProfile, match="profiles for h200 here: qwen3-8b"):
        P.find_profile("h200", "llama-3.1-8b", tmp_path)
    path = filled_profile().save(P.profile_path("h200", "llama-3.1-8b", tmp_path))
    assert P.find_profile("h200", "llama-3.1-8b", tmp_path) == path


def test_graphs_dir_honors_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("BULLET_GRAPHS_DIR", raising=False)
    default = P.graphs_dir()
    assert default.name == "graphs" and (default.parent / "bullet_kernels" / "__init__.py").is_file()
    assert (default / "README.md").is_file()  # the schema spec ships beside the profiles
    monkeypatch.setenv("BULLET_GRAPHS_DIR", str(tmp_path))
    assert P.graphs_dir() == tmp_path
    assert P.profile_path("h200", "llama-3.1-8b") == tmp_path / "h200" / "llama-3.1-8b.json"
    with pytest.raises(MissingProfile, match=str(tmp_path)):
        P.find_profile("h200", "llama-3.1-8b")


def test_check_matches_same_gpu_and_model_passes():
    prof = filled_profile()
    assert prof.check_matches(device_name="NVIDIA H200", sm_count=132,
                              model_config=preset_config("llama-3.1-8b"), dtype="bfloat16") == []
    assert prof.check_matches(model_config=PRESETS["llama-3.1-8b"]) == []  # HF names
    assert prof.check_matches() == []  # nothing asked, nothing compared


def test_check_matches_strict_raises_with_both_sides():
    prof = filled_profile()
    with pytest.raises(ProfileMismatch) as err:
        prof.check_matches(sm_count=114)
    message = str(err.value)
    assert "132" in message and "114" in message and "bullet profile --model llama-3.1-8b" in message
    with pytest.raises(ProfileMismatch, match="NVIDIA H100 80GB HBM3"):
        prof.check_matches(device_name="NVIDIA H100 80GB HBM3")
    with pytest.raises(ProfileMismatch, match=r"hidden_size: the profile has 4096, running 5120"):
        prof.check_matches(model_config={**PRESETS["llama-3.1-8b"], "hidden_size": 5120})


def test_check_matches_non_strict_returns_the_mismatches():
    prof = filled_profile()
    ours = {"hidden_size": 5120, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128}
    found = prof.check_matches(sm_count=114, model_config=ours, strict=False)
    assert len(found) == 2
    assert "SM count" in found[0] and "132" in found[0] and "114" in found[0]
    assert "hidden_size" in found[1] and "4096" in found[1] and "5120" in found[1]
    # our ModelConfig names and HF names compare alike; another architecture is another model
    other = prof.check_matches(model_config=preset_config("qwen3-8b"), strict=False)
    assert any("architecture" in m for m in other) and any("num_layers" in m for m in other)
    assert any("intermediate_size" in m for m in other) and any("vocab_size" in m for m in other)


def test_check_matches_derives_head_dim_and_kv_heads_like_from_hf():
    prof = filled_profile()
    hf = {k: v for k, v in PRESETS["llama-3.1-8b"].items() if k not in ("head_dim",)}
    assert prof.check_matches(model_config=hf) == []  # head_dim = 4096 // 32 = 128
    del prof.model_config["num_key_value_heads"]  # a profile that omits it means MHA
    assert prof.check_matches(model_config={"num_kv_heads": 32}) == []
    with pytest.raises(ProfileMismatch, match="num_kv_heads"):
        prof.check_matches(model_config={"num_kv_heads": 8})


def test_model_config_dict_is_json_and_reads_back():
    cfg = preset_config("llama-3.1-8b")
    d = P.model_config_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert d["hidden_size"] == 4096 and d["num_hidden_layers"] == 32
    assert d["rope_scaling"]["rope_type"] == "llama3"  # the nested rope scaling became a dict
    assert type(cfg).from_hf(d) == cfg
    assert P.model_config_dict(PRESETS["qwen3-8b"]) == PRESETS["qwen3-8b"]
    with pytest.raises(TypeError):
        P.model_config_dict(42)
