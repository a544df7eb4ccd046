"""Specification of the Qwen2 thinker: transformers' Qwen2ForCausalLM is the reference."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import full_mesh, single_device_mesh
from flax import nnx

from hellochat_jax.checkpoint.io import CheckpointError, SafetensorsSource, TorchSource
from hellochat_jax.components.qwen2 import weights as hf_qwen2
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.decoding import Greedy, Nucleus, RepetitionPenalty, decode, generate, left_pad, sampling_method

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_CONFIGS = {
    "odd-heads-1kv": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, intermediate_size=72, num_hidden_layers=2, rope_theta=10000.0, tie_word_embeddings=False),
    "gqa-tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, num_hidden_layers=3, rope_theta=1e6, tie_word_embeddings=True),
    "mha-5heads": dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5, intermediate_size=64, num_hidden_layers=1, rope_theta=500.0, tie_word_embeddings=False),
    "gqa-6-3": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=128, num_hidden_layers=2, rope_theta=1e6, tie_word_embeddings=True),
}


def make_hf_model(tmp_path: Path, name: str, seed: int = 0, vocab: int = 300, dtype=None) -> tuple[Path, "torch.nn.Module"]:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=512, **TINY_CONFIGS[name])
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases and norms so every weight matters
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0.0 if n.endswith("bias") else 1.0, 0.1)
    if dtype is not None:
        model = model.to(dtype)
    path = tmp_path / name
    model.save_pretrained(path)
    return path, model


def left_padded_batch(vocab: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, vocab, size=n).tolist() for n in (11, 6, 9)]
    return left_pad(rows, pad_id=0)


def hf_logits(model, ids, mask):
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


def our_logits(model, ids, mask, mesh):
    @nnx.jit
    def f(model, ids, mask):
        return model(ids, attention_mask=mask)[0]

    with jax.set_mesh(mesh):
        batch = shd.put_batch((ids, mask), mesh)
        return np.asarray(f(model, *batch))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers_on_left_padded_batches(tmp_path, name):
    path, ref = make_hf_model(tmp_path, name)
    mesh = single_device_mesh()
    _, model = hf_qwen2.load(path, mesh, precision="highest")
    ids, mask = left_padded_batch(ref.config.vocab_size)
    ours, theirs = our_logits(model, ids, mask, mesh), hf_logits(ref, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)


def test_sharded_equals_unsharded(tmp_path):
    path, ref = make_hf_model(tmp_path, "gqa-6-3")
    ids, mask = left_padded_batch(ref.config.vocab_size)
    results = []
    for mesh in (single_device_mesh(), full_mesh(2, 2, 2), full_mesh(1, 2, 4)):
        _, model = hf_qwen2.load(path, mesh, precision="highest")
        results.append(our_logits(model, ids, mask, mesh))
    valid = mask.astype(bool)
    for other in results[1:]:
        np.testing.assert_allclose(other[valid], results[0][valid], atol=1e-5, rtol=1e-5)


def test_parameters_are_laid_out_by_the_rules(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-tied")
    mesh = full_mesh(2, 2, 2)
    _, model = hf_qwen2.load(path, mesh)
    q = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # (embed, heads)
    emb = model.model.embed_tokens.embedding[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # (vocab, embed)


# 70 tokens: the prefill runs its attention in query blocks (causal_attention)
@pytest.mark.parametrize("name,prompt_len", [("odd-heads-1kv", 7), ("gqa-tied", 7), ("gqa-tied", 150)])
def test_greedy_generation_is_token_exact_with_transformers(tmp_path, name, prompt_len):
    path, ref = make_hf_model(tmp_path, name, seed=3)
    mesh = full_mesh(2, 2, 2)
    _, model = hf_qwen2.load(path, mesh, precision="highest")
    prompt = np.random.default_rng(5).integers(1, ref.config.vocab_size, size=(1, prompt_len)).astype(np.int32)
    with torch.no_grad():
        expected = ref.generate(torch.tensor(prompt, dtype=torch.long), attention_mask=torch.ones(1, prompt_len, dtype=torch.long), max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, prompt_len:].numpy()
    tokens, lengths = generate(model, prompt, max_new_tokens=12, mesh=mesh)
    np.testing.assert_array_equal(tokens[0], expected)
    assert lengths[0] == 12


def test_left_padded_rows_generate_as_if_alone(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-tied", seed=4)
    mesh = single_device_mesh()
    _, model = hf_qwen2.load(path, mesh, precision="highest")
    rows = [[5, 9, 13, 2, 7, 8, 21], [44, 3, 17], list(range(1, 100))]  # 99 tokens: a blocked prefill
    ids, mask = left_pad(rows, multiple=8)
    batched, _ = generate(model, ids, mask, max_new_tokens=6, mesh=mesh)
    for i, row in enumerate(rows):
        alone, _ = generate(model, np.array([row], np.int32), max_new_tokens=6, mesh=mesh)
        np.testing.assert_array_equal(batched[i], alone[0])


def test_repetition_penalty_matches_transformers(tmp_path):
    path, ref = make_hf_model(tmp_path, "mha-5heads", seed=6)
    mesh = single_device_mesh()
    _, model = hf_qwen2.load(path, mesh, precision="highest")
    prompt = np.array([[3, 4, 5, 6, 3, 4]], np.int32)
    with torch.no_grad():
        expected = ref.generate(torch.tensor(prompt, dtype=torch.long), attention_mask=torch.ones_like(torch.tensor(prompt)), max_new_tokens=10, min_new_tokens=10, do_sample=False, repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[0, 6:].numpy()
    tokens, _ = generate(model, prompt, max_new_tokens=10, sampling=RepetitionPenalty(Greedy(), 1.5), mesh=mesh)
    np.testing.assert_array_equal(tokens[0], expected)


@pytest.fixture
def free_run(tmp_path):
    """(model, prompt, mesh, free): a tied GQA model and its greedy continuation with no stop token."""
    path, _ = make_hf_model(tmp_path, "gqa-tied", seed=7)
    mesh = single_device_mesh()
    _, model = hf_qwen2.load(path, mesh)
    prompt = np.array([[1, 2, 3]], np.int32)
    free, _ = generate(model, prompt, max_new_tokens=8, mesh=mesh)
    return model, prompt, mesh, free


def test_stop_tokens_end_rows_and_pad_the_rest(free_run):
    model, prompt, mesh, free = free_run
    stop = int(free[0, 3])
    tokens, lengths = generate(model, prompt, max_new_tokens=8, stop_tokens=[stop], pad_id=0, mesh=mesh)
    first = int(np.argmax(free[0] == stop))
    assert lengths[0] == first
    np.testing.assert_array_equal(tokens[0, :first], free[0, :first])
    assert np.all(tokens[0, first:] == 0)


def test_stop_tokens_are_ignored_below_min_new_tokens(free_run):
    model, prompt, mesh, free = free_run
    stop = int(free[0, 1])
    tokens, lengths = generate(model, prompt, max_new_tokens=8, stop_tokens=[stop], min_new_tokens=4, mesh=mesh)
    assert lengths[0] >= 4 and stop not in tokens[0, :4].tolist()


def test_generate_options_map_to_sampling_methods():
    assert sampling_method() == Greedy()
    assert sampling_method(temperature=0.7, top_k=5, top_p=0.9) == Nucleus(0.7, 5, 0.9)
    assert sampling_method(repetition_penalty=1.3) == RepetitionPenalty(Greedy(), 1.3)
    with pytest.raises(ValueError, match="top_p"):
        sampling_method(temperature=1.0, top_p=0.0)


def test_sampling_is_seeded_and_filters_behave(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-tied", seed=8)
    mesh = single_device_mesh()
    _, model = hf_qwen2.load(path, mesh)
    prompt = np.array([[1, 2, 3, 4]], np.int32)
    greedy, _ = generate(model, prompt, max_new_tokens=6, mesh=mesh)
    top1, _ = generate(model, prompt, max_new_tokens=6, sampling=Nucleus(temperature=0.8, top_k=1), key=jax.random.key(1), mesh=mesh)
    np.testing.assert_array_equal(top1, greedy)  # top-k 1 is greedy
    tiny_p, _ = generate(model, prompt, max_new_tokens=6, sampling=Nucleus(temperature=1.0, top_p=1e-6), key=jax.random.key(2), mesh=mesh)
    np.testing.assert_array_equal(tiny_p, greedy)  # top-p keeps at least the best token
    a, _ = generate(model, prompt, max_new_tokens=6, sampling=Nucleus(temperature=1.5), key=jax.random.key(3), mesh=mesh)
    b, _ = generate(model, prompt, max_new_tokens=6, sampling=Nucleus(temperature=1.5), key=jax.random.key(3), mesh=mesh)
    np.testing.assert_array_equal(a, b)


def test_decoding_does_not_recompile_per_token_or_per_call(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-tied", seed=9)
    mesh = single_device_mesh()
    _, model = hf_qwen2.load(path, mesh)
    generate(model, np.array([[1, 2, 3, 4]], np.int32), max_new_tokens=16, mesh=mesh)
    compiled = decode._cache_size()
    generate(model, np.array([[7, 8, 9, 10]], np.int32), max_new_tokens=16, mesh=mesh)
    assert decode._cache_size() == compiled


def test_scan_and_remat_do_not_change_logits(tmp_path):
    path, ref = make_hf_model(tmp_path, "gqa-6-3")
    mesh = single_device_mesh()
    ids, mask = left_padded_batch(ref.config.vocab_size)
    _, plain = hf_qwen2.load(path, mesh, precision="highest")
    _, scanned = hf_qwen2.load(path, mesh, precision="highest", scan_layers=True, remat="full")
    valid = mask.astype(bool)
    np.testing.assert_allclose(our_logits(scanned, ids, mask, mesh)[valid], our_logits(plain, ids, mask, mesh)[valid], atol=1e-5)


def test_bfloat16_compute_is_close_to_float32(tmp_path):
    path, ref = make_hf_model(tmp_path, "gqa-tied")
    mesh = single_device_mesh()
    ids, mask = left_padded_batch(ref.config.vocab_size)
    _, f32 = hf_qwen2.load(path, mesh)
    _, bf16 = hf_qwen2.load(path, mesh, dtype="bfloat16", param_dtype="float32")
    valid = mask.astype(bool)
    a, b = our_logits(f32, ids, mask, mesh)[valid], our_logits(bf16, ids, mask, mesh)[valid]
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


# ----------------------------------------------------------------------------- converter


@pytest.mark.parametrize("shard", [False, True])
def test_hf_to_jax_to_hf_is_bit_exact(tmp_path, shard):
    path, _ = make_hf_model(tmp_path, "gqa-6-3")
    cfg, model = hf_qwen2.load(path, full_mesh(2, 2, 2))
    out = hf_qwen2.export(model, cfg, tmp_path / "exported", max_shard_bytes=40_000 if shard else None)
    a, b = SafetensorsSource(path), SafetensorsSource(out)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert a.get(k).dtype == b.get(k).dtype and np.array_equal(a.get(k), b.get(k)), k
    if shard:
        assert (out / "model.safetensors.index.json").exists()
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out)  # transformers reads our export
    assert reloaded.config.num_key_value_heads == 3


def test_bfloat16_checkpoints_round_trip_bit_exact(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-tied", dtype=torch.bfloat16)
    cfg, model = hf_qwen2.load(path, single_device_mesh())
    assert cfg.param_dtype == "bfloat16"
    out = hf_qwen2.export(model, cfg, tmp_path / "exported")
    a, b = SafetensorsSource(path), SafetensorsSource(out)
    for k in a.keys():
        assert np.array_equal(a.get(k).view(np.uint16), b.get(k).view(np.uint16)), k


def test_orbax_checkpoint_restores_on_another_mesh(tmp_path):
    from hellochat_jax.checkpoint.load import load_checkpoint, save_checkpoint

    path, ref = make_hf_model(tmp_path, "gqa-tied")
    cfg, model = hf_qwen2.load(path, full_mesh(2, 2, 2), precision="highest")
    save_checkpoint(model, cfg, tmp_path / "ckpt", "qwen2")
    mesh = single_device_mesh()
    component, cfg2, restored = load_checkpoint(tmp_path / "ckpt", mesh)
    assert component == "qwen2" and cfg2 == cfg
    ids, mask = left_padded_batch(ref.config.vocab_size)
    valid = mask.astype(bool)
    np.testing.assert_allclose(our_logits(restored, ids, mask, mesh)[valid], hf_logits(ref, ids, mask)[valid], atol=1e-4)


def _copy_with(tmp_path, path, edit):
    from safetensors.numpy import save_file

    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = {k: SafetensorsSource(path).get(k) for k in SafetensorsSource(path).keys()}
    edit(tensors)
    save_file(tensors, str(broken / "model.safetensors"))
    return broken


def test_missing_key_is_refused_by_name(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-6-3")
    broken = _copy_with(tmp_path, path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys.*model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_qwen2.load(broken, single_device_mesh())


def test_unexpected_key_is_refused_by_name(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-6-3")
    broken = _copy_with(tmp_path, path, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*model\.layers\.0\.self_attn\.extra\.weight"):
        hf_qwen2.load(broken, single_device_mesh())


def test_wrong_shape_is_refused_by_name(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-6-3")
    broken = _copy_with(tmp_path, path, lambda t: t.update({"model.norm.weight": np.ones(95, np.float32)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped keys.*model\.norm\.weight.*\(95,\)"):
        hf_qwen2.load(broken, single_device_mesh())


def test_truncated_safetensors_is_refused(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-6-3")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        hf_qwen2.load(path, single_device_mesh())


def test_pickle_with_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    for name, write in [("zip", lambda obj, f: torch.save(obj, f)), ("legacy", lambda obj, f: pickle.dump(obj, open(f, "wb")))]:
        bad = tmp_path / f"evil-{name}.pt"
        write({"model": {"w": torch.zeros(2)}, "hook": Exploit()}, bad)
        with pytest.raises(CheckpointError, match="refused"):
            TorchSource(bad, state_dict_key="model")


# ----------------------------------------------------------------------------- fixtures / CLI


# The fixtures themselves pass on 1 and 8 devices: tests/test_verify.py (every fixture).


def make_tokenizer(path: Path, vocab: int = 300) -> Path:
    """A tiny byte-level BPE with Qwen's chat tokens and template, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello there, how are you today?"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)
    return path


def test_cli_convert_export_and_generate(tmp_path):
    path, _ = make_hf_model(tmp_path, "gqa-tied")
    tok = make_tokenizer(tmp_path / "tok")
    exe = [sys.executable, "-m", "hellochat_jax.cli"]
    env_run = dict(capture_output=True, text=True, timeout=300)
    r = subprocess.run(exe + ["convert", "qwen2", "--hf", str(path), "--out", str(tmp_path / "ckpt")], **env_run)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(exe + ["convert", "qwen2-export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")], **env_run)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").exists()
    r = subprocess.run(exe + ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tok), "--prompt", "hello", "--prompt", "how are you", "--max-new-tokens", "5"], **env_run)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) >= 1


def test_real_qwen25_configs_derive_from_config_json():
    from hellochat_jax.components.qwen2.model import Qwen2Config

    # The fields of Qwen2.5-7B-Instruct's config.json that matter (as published).
    hf_7b = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
             "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "use_sliding_window": False, "vocab_size": 152064, "max_position_embeddings": 32768, "max_window_layers": 28}
    cfg = Qwen2Config.from_hf(hf_7b)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (128, 4, False)
    hf_05b = dict(hf_7b, hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_hidden_layers=24,
                  num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936)
    cfg = Qwen2Config.from_hf(hf_05b)
    assert (cfg.head_dim, cfg.tie_word_embeddings) == (64, True)
    with pytest.raises(ValueError, match="sliding-window"):
        Qwen2Config.from_hf(dict(hf_7b, use_sliding_window=True))


def test_blocked_causal_attention_equals_full_attention_and_its_gradient():
    """The training/prefill path computes attention in query blocks over key prefixes; on every
    row that attends to something it is the full masked attention, values and gradients."""
    from hellochat_jax.components.qwen2.model import causal_attention, grouped_attention

    b, t, h, kvh, d = 2, 150, 6, 2, 8  # 150 = 2 blocks of 64 + a partial one
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (b, t, n, d)) for kk, n in zip(ks, (h, kvh, kvh)))
    segment = np.ones((b, t), np.int32)
    segment[0, :13] = 0  # left padding
    segment[1, 40:] = 2  # two packed sequences
    slot = np.arange(t)
    allowed = (slot[None, None, :] <= slot[None, :, None]) & (segment[:, None, :] == segment[:, :, None]) & (segment[:, None, :] > 0)
    live = jax.numpy.asarray(segment > 0)[:, :, None, None]

    def loss(fn, q, k, v):
        return jax.numpy.sum(jax.numpy.where(live, fn(q, k, v, allowed, None), 0.0) ** 2)

    ours = jax.value_and_grad(lambda *a: loss(causal_attention, *a), argnums=(0, 1, 2))(q, k, v)
    full = jax.value_and_grad(lambda *a: loss(grouped_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for a, e in zip(jax.tree.leaves(ours), jax.tree.leaves(full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)
