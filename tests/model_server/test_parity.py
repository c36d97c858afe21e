"""Our JAX models against transformers' PyTorch implementation on the same random weights."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from model_server import checkpoint as ck  # noqa: E402
from model_server.models import base  # noqa: E402

FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "mistral_sw", "qwen3_sw", "phi3", "gemma2",
            "gemma3"]
#: The fast tier checks these families; the sweep over the others is `slow` (`pytest -m "not slow"`).
FAST = ("gpt2", "llama")
PROMPT_LENS = [5, 11, 17]
BUCKET = 32
NEW_TOKENS = 32


def _sweep(families: list[str]) -> list:
    """`families` as parameters, those outside FAST marked slow."""
    return [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in families]


def _prompts(seed: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).astype(np.int32) for n in PROMPT_LENS]


def _hf_logits(model, prompt: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(prompt[None], dtype=torch.long)).logits[0].numpy()


def _prefill_batch(prompts):
    tokens = np.zeros((len(prompts), BUCKET), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    positions = np.tile(np.arange(BUCKET, dtype=np.int32), (len(prompts), 1))
    return tokens, positions


@pytest.mark.parametrize("family", _sweep(FAMILIES))
def test_logits_match(torch_models, family):
    model, path = torch_models[family]
    ckpt, params = ck.load_checkpoint(path, "float32")
    spec = ckpt.spec
    assert ckpt.format == "hf"
    prompts = _prompts(1, spec.vocab_size)
    tokens, positions = _prefill_batch(prompts)
    fwd = jax.jit(base.make_forward(spec), donate_argnums=(3,))
    cache = base.init_cache(spec, 16, 16, jnp.float32)
    # rows go to shuffled blocks of the pool (a padded prefill batch with different prompt lengths)
    tables = np.array([[12, 3, 7, 0], [5, 9, 1, 14], [2, 11, 6, 15]], np.int32)
    logits, cache = fwd(params, tokens, positions, cache, tables)
    nocache, _ = jax.jit(base.make_forward(spec))(params, tokens, positions, None, None)
    for b, prompt in enumerate(prompts):
        ref = _hf_logits(model, prompt)
        np.testing.assert_allclose(np.asarray(logits[b, :len(prompt)]), ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(nocache[b, :len(prompt)]), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", _sweep(FAMILIES))
def test_flax_module_state_is_the_checkpoint_tree(torch_models, family):
    """The family's NNX module declares exactly the params the checkpoint tables fill, and
    `bind` makes a module whose state is the loaded arrays themselves."""
    _, path = torch_models[family]
    ckpt, params = ck.load_checkpoint(path, "float32")
    spec = ckpt.spec
    declared = jax.tree.map(lambda a: tuple(a.shape),
                            nnx.to_pure_dict(nnx.state(base.abstract_module(spec))))
    shapes = base.param_shapes(spec)
    assert declared == {**shapes, "layers": dict(enumerate(shapes["layers"]))}
    module = base.bind(spec, params)
    assert isinstance(module, nnx.Module) and len(module.layers) == spec.num_layers
    state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    assert state["layers"][spec.num_layers - 1]["wq"] is params["layers"][-1]["wq"]
    assert jax.tree.structure(state) == jax.tree.structure(
        {**params, "layers": dict(enumerate(params["layers"]))})


@pytest.mark.parametrize("family", _sweep(FAMILIES))
def test_greedy_matches_generate(torch_models, family):
    """Prefill into the paged cache, then batched decode steps through the block tables, vs HF
    generate."""
    model, path = torch_models[family]
    ckpt, params = ck.load_checkpoint(path, "float32")
    spec = ckpt.spec
    prompts = _prompts(2, spec.vocab_size)
    num_slots, max_len = len(prompts), BUCKET + NEW_TOKENS

    fwd = jax.jit(base.make_forward(spec), donate_argnums=(3,))
    blocks = -(-max_len // 16)  # each sequence its own run of 16-position blocks
    cache = base.init_cache(spec, num_slots * blocks, 16, jnp.float32)
    tables = np.arange(num_slots * blocks, dtype=np.int32).reshape(num_slots, blocks)
    tokens, positions = _prefill_batch(prompts)
    logits, cache = fwd(params, tokens, positions, cache, tables)
    lens = np.array([len(p) for p in prompts], np.int32)
    last = np.asarray(logits)[np.arange(num_slots), lens - 1].argmax(-1).astype(np.int32)
    generated = [last]
    pos = lens.copy()
    for _ in range(NEW_TOKENS - 1):
        logits, cache = fwd(params, last[:, None], pos[:, None], cache, tables)
        last = np.asarray(logits[:, 0]).argmax(-1).astype(np.int32)
        generated.append(last)
        pos += 1
    ours = np.stack(generated, axis=1)

    model.generation_config.eos_token_id = None
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(torch.tensor(prompt[None], dtype=torch.long), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        ref = out[0, len(prompt):].numpy()
        assert len(set(ref.tolist())) >= 4, "degenerate reference output makes a weak test"
        assert ours[b].tolist() == ref.tolist(), f"{family} prompt {b} diverges"


def test_sharded_checkpoint_uses_index(torch_models):
    _, path = torch_models["qwen2"]
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1
    ckpt = ck.open_checkpoint(path)
    assert ckpt.spec.qkv_bias and ckpt.spec.tie_word_embeddings
    assert ckpt.spec.architecture == "Qwen2ForCausalLM"


def test_llama_spec_from_config(torch_models):
    ckpt = ck.open_checkpoint(torch_models["llama"][1])
    s = ckpt.spec
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 2, 16)
    assert (s.rope_type, s.rope_factor, s.rope_original_max_position) == ("llama3", 8.0, 64)
    assert s.rope_theta == 500000.0 and not s.tie_word_embeddings
    assert s.eos_token_ids == (0,)


def test_mistral_spec(torch_models):
    spec = ck.open_checkpoint(torch_models["mistral"][1]).spec
    assert (spec.family, spec.model_type, spec.num_kv_heads, spec.sliding_window) == ("llama", "mistral", 1, None)
    assert spec.max_seq_len_limit == 256


def test_windows_per_layer_and_no_position_limit(torch_models):
    """A window is a per-layer mask, never the context limit (a Mistral with an 8-position
    window serves 128 positions); layer patterns come from layer_types or the family default."""
    from model_server.knobs import ServingKnobs

    windows = {name: ck.open_checkpoint(torch_models[name][1]).spec for name in
               ("mistral_sw", "qwen3_sw", "phi3", "gemma2", "gemma3", "qwen3")}
    assert [windows["mistral_sw"].window_of(i) for i in range(2)] == [8, 8]
    assert windows["mistral_sw"].max_seq_len_limit == 256
    assert ServingKnobs(max_seq_len=128).resolve(windows["mistral_sw"].max_seq_len_limit).max_seq_len == 128
    assert windows["qwen3_sw"].layer_windows == (0, 12, 12)
    assert [windows["phi3"].window_of(i) for i in range(2)] == [10, 10] and windows["phi3"].rope_dim == 8
    assert windows["gemma2"].layer_windows == (8, 0, 8)
    assert windows["gemma3"].layer_windows == (6, 6, 6, 6, 6, 0, 6)
    assert (windows["gemma3"].rope_local_theta, windows["gemma3"].rope_type) == (1000.0, "linear")
    assert windows["qwen3"].window_of(0) is None and windows["qwen3"].qk_norm
    for spec in windows.values():  # as an Orbax conversion stores it
        assert base.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("change,field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "rope_scaling.rope_type"),
    ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
    ({"architectures": ["Qwen3MoeXForCausalLM"]}, "architectures"),
    ({"hidden_act": "xielu"}, "hidden_act"),
])
def test_unservable_configs_name_the_field(torch_models, change, field):
    cfg = {**dict(torch_models["mistral_sw"][0].config.to_dict()), **change}
    with pytest.raises(base.ModelConfigError, match=f"config.json {field}"):
        base.spec_from_hf_config(cfg)


@pytest.mark.parametrize("family", _sweep(["llama", "qwen3_sw", "phi3", "gemma2", "gemma3"]))
def test_bfloat16_close_to_float32(torch_models, family):
    """bfloat16 weights and KV cache: a prefill longer than the windows, then decode steps
    past it, close to transformers' float32 logits."""
    model, path = torch_models[family]
    ckpt, params = ck.load_checkpoint(path, "bfloat16")
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params))
    prompt = _prompts(3, ckpt.spec.vocab_size)[2]
    extra = np.random.default_rng(4).integers(1, ckpt.spec.vocab_size, 4).astype(np.int32)
    fwd = jax.jit(base.make_forward(ckpt.spec), donate_argnums=(3,))
    cache = base.init_cache(ckpt.spec, 4, 16, jnp.bfloat16)
    table = np.array([[2, 0, 3, 1]], np.int32)
    logits, cache = fwd(params, prompt[None], np.arange(len(prompt), dtype=np.int32)[None], cache, table)
    rows = [np.asarray(logits[0])]
    for i, tok in enumerate(extra):
        step, cache = fwd(params, np.array([[tok]], np.int32), np.array([[len(prompt) + i]], np.int32), cache, table)
        rows.append(np.asarray(step[0]))
    assert logits.dtype == jnp.float32 and cache[0][0].dtype == jnp.bfloat16
    ref = _hf_logits(model, np.concatenate([prompt, extra]))
    ours = np.concatenate(rows)
    assert np.abs(ours - ref[:len(ours)]).max() < 0.15 * np.abs(ref).max(), family


SHARDED = """
import json, sys
import jax, numpy as np
from model_server import registry
from model_server.models import base
assert len(jax.devices()) == 2
model = registry.load_model("lm.hf", sys.argv[1], {"num_slots": 1, "max_seq_len": 32, "dtype": "float32"},
                            mesh=base.make_mesh())
prompt = np.array(json.loads(sys.argv[2]), np.int32)[None]
logits, _ = jax.jit(base.make_forward(model.spec))(model.params, prompt, np.arange(prompt.shape[1],
                                                   dtype=np.int32)[None], None, None)
split = [a.addressable_shards[0].data.shape != a.shape for a in jax.tree.leaves(model.params["layers"][0])]
print(json.dumps({"logits": np.asarray(logits[0]).tolist(), "split": any(split)}))
"""


@pytest.mark.parametrize("family", _sweep(["phi3", "gemma3"]))
def test_tensor_parallel_matches_transformers(torch_models, family):
    """Two forced host devices: the windowed families' heads and MLPs split over the mesh."""
    import os
    import subprocess
    import sys

    model, path = torch_models[family]
    prompt = _prompts(6, model.config.vocab_size)[2]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED, str(path), json.dumps(prompt.tolist())], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["split"]
    np.testing.assert_allclose(np.array(got["logits"]), _hf_logits(model, prompt), atol=1e-4, rtol=0)
