"""Our JAX models against transformers' PyTorch implementation on the same random weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from model_server import checkpoint as ck  # noqa: E402
from model_server.models import base  # noqa: E402

FAMILIES = ["gpt2", "llama", "mistral", "qwen2"]
PROMPT_LENS = [5, 11, 17]
BUCKET = 32
NEW_TOKENS = 32


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


@pytest.mark.parametrize("family", FAMILIES)
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


@pytest.mark.parametrize("family", FAMILIES)
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


@pytest.mark.parametrize("family", FAMILIES)
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


def test_bfloat16_close_to_float32(torch_models):
    model, path = torch_models["llama"]
    ckpt, params = ck.load_checkpoint(path, "bfloat16")
    prompt = _prompts(3, ckpt.spec.vocab_size)[1]
    logits, _ = jax.jit(base.make_forward(ckpt.spec))(
        params, prompt[None], np.arange(len(prompt), dtype=np.int32)[None], None, None)
    assert logits.dtype == jnp.float32
    ref = _hf_logits(model, prompt)
    assert np.abs(np.asarray(logits[0]) - ref).max() < 0.15 * np.abs(ref).max()
