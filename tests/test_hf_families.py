"""Hugging Face families beyond GPT-2: Llama (with Llama 3.1's llama3 rope scaling), Mistral,
Qwen2 (q/k/v biases) and Qwen3 (per-head QK-norm with gains, head size other than width /
heads), imported from tiny random folders written by transformers itself and compared with
it; the model fields they need (qk_gain, qkv_bias, head_dim, rope_scaling) and the
hand-written backward of the QK gains; loading on the fly."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.generate import generate_tokens
from moorelm.model import GPT, _NormRotate, norm_rotate, rope_tables
from moorelm.run import RunFolder
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT

transformers = pytest.importorskip("transformers")

from moorelm.interop.hf import import_hf, read_hf  # noqa: E402

V = 320  # the char tokenizer: 256 bytes + the corpus characters
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True,
                                                           num_key_value_heads=4)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4096)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False)),
    # 4 heads of 16 in a 32-wide model: the head size is not width / heads
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, rms_norm_eps=1e-5)),
    "qwen3-bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8, attention_bias=True)),
}


def hf_folder(path, family: str, seed: int = 0, shard: str | None = None, **extra):
    """A tiny transformers model of ``family`` (every parameter perturbed, so a swapped,
    transposed or dropped tensor shows in the logits) saved with a moorelm char tokenizer."""
    config_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    conf = getattr(transformers, config_cls)(**{**COMMON, **kw, **extra})
    hf = getattr(transformers, model_cls)(conf).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tok = Tokenizer.train([SMALL_TEXT], "char")
    (path / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    return hf


def hf_greedy(hf, idx: torch.Tensor, n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # run the full n tokens, as moorelm is asked to
    hf.generation_config.pad_token_id = 0
    out = hf.generate(idx, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(idx))
    return out[0, idx.shape[1]:].tolist()


def moorelm_greedy(model: GPT, idx: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens through moorelm's KV cache and one-token decode plan."""
    return [int(t) for t in generate_tokens(model, idx, n, temperature=0)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_and_greedy_match_transformers(tmp_path, family):
    """Each family imports from a transformers folder with logits within 1e-4 (fp32) of
    transformers' and the same 16 greedy tokens, moorelm decoding through its cache."""
    hf = hf_folder(tmp_path / "hf", family)
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model = RunFolder(run).load(device="cpu").model
    cfg = model.config
    assert cfg.qk_gain == cfg.qk_norm == family.startswith("qwen3")
    assert cfg.qkv_bias == (family == "qwen2")
    if family == "qwen3":
        assert cfg.head_dim == 16 and cfg.head_dim * cfg.n_head != cfg.n_embd
    idx = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = idx[:1, :8]
    with torch.no_grad():
        assert moorelm_greedy(model, prompt, 16) == hf_greedy(hf, prompt, 16)


def test_sharded_qwen3_imports_like_single_file(tmp_path):
    """A Qwen3 folder saved in several safetensors shards (with an index) imports to the same
    weights as the single-file folder."""
    hf_folder(tmp_path / "one", "qwen3")
    hf_folder(tmp_path / "many", "qwen3", shard="20KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "many" / "model.safetensors").exists()
    a, b = read_hf(tmp_path / "one"), read_hf(tmp_path / "many")
    assert a.config == b.config and a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_mistral_sliding_window_caps_the_context(tmp_path):
    """A Mistral folder whose sliding window is shorter than its context imports with the
    context capped at the window (said once), where full attention is exact: logits equal
    transformers' over the whole window; asking for a longer --seq-len is refused."""
    hf = hf_folder(tmp_path / "hf", "mistral", sliding_window=16)
    with pytest.warns(UserWarning, match="sliding_window of 16"):
        imported = read_hf(tmp_path / "hf")
    assert imported.config.seq_len == 16
    model = imported.build().eval()
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
    with pytest.raises(MoorelmError, match="longer than the model's sliding_window 16"):
        read_hf(tmp_path / "hf", seq_len=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_hf(tmp_path / "hf", seq_len=8).config.seq_len == 8


# head size 8, base 1e4: frequencies 1, 0.1, 0.01, 0.001 (wavelengths 6.3, 63, 628, 6283). With
# an original context of 64 and factors 1 / 4 the first is kept (< 16), the second blended
# (16..64) and the last two divided by 4 (> 64); 256 positions reach well past 64.
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def llama3_folder(path, seed: int = 0):
    return hf_folder(path, "llama", seed, max_position_embeddings=256,
                     rope_parameters={**LLAMA3, "rope_theta": 10000.0})


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """A Llama 3.1-style folder (llama3 rope scaling) imports with that scaling: the rotary
    frequencies are transformers' (every band: kept, blended, divided), logits over 200
    positions are within 1e-4 of transformers' (and far from unscaled rotary positions), and
    greedy tokens decoded through moorelm's cache past the original context equal
    transformers'."""
    hf = llama3_folder(tmp_path / "hf")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model = RunFolder(run).load(device="cpu").model
    assert model.config.rope_scaling == LLAMA3 and model.config.seq_len == 256
    theirs_freq = hf.model.rotary_emb.inv_freq.double()
    plain = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    assert theirs_freq[0] == plain[0] and (theirs_freq[2:] / plain[2:] - 0.25).abs().max() < 1e-6
    assert 0.25 < theirs_freq[1] / plain[1] < 0.9  # the blended band
    cos, _ = rope_tables(8, 256, 10000.0, LLAMA3)
    ours_freq = cos[1, :4].double().acos()  # angle at position 1 is the frequency
    assert (ours_freq - theirs_freq).abs().max() < 1e-4
    assert torch.equal(model.rope_cos, cos)
    idx = torch.randint(0, V, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
        unscaled = GPT(ModelConfig.from_dict({**model.config.to_dict(), "rope_scaling": None}))
        unscaled.load_state_dict(model.state_dict())
        wrong, _ = unscaled.eval()(idx)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (wrong - theirs).abs().max().item() > 1e-2
    prompt = idx[:1, :60]
    with torch.no_grad():
        assert moorelm_greedy(model, prompt, 24) == hf_greedy(hf, prompt, 24)


def test_llama3_rope_scaling_reads_either_field_name(tmp_path):
    """transformers 4's ``rope_scaling`` (with a top-level rope_theta) and transformers 5's
    ``rope_parameters`` give the same imported config; a missing original context falls back
    to max_position_embeddings, as transformers does."""
    llama3_folder(tmp_path / "hf")
    new = read_hf(tmp_path / "hf").config
    _edit_config(tmp_path / "hf", rope_parameters=None, rope_theta=10000.0, rope_scaling=LLAMA3)
    assert read_hf(tmp_path / "hf").config == new
    short = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    _edit_config(tmp_path / "hf", rope_scaling=short)
    assert read_hf(tmp_path / "hf").config.rope_scaling == {
        **LLAMA3, "original_max_position_embeddings": 256}
    _edit_config(tmp_path / "hf", rope_scaling={**LLAMA3, "high_freq_factor": 1.0})
    with pytest.raises(MoorelmError, match="high_freq_factor .* must be greater"):
        read_hf(tmp_path / "hf")


def test_llama3_load_on_the_fly_equals_import(tmp_path):
    """moorelm.load(HF_DIR) of a llama3-scaled folder builds the same rotary tables and logits
    as importing it (the in-memory build path rebuilds the scaled tables)."""
    import moorelm

    llama3_folder(tmp_path / "hf")
    direct = moorelm.load(tmp_path / "hf", device="cpu")
    run = moorelm.load(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu")
    assert direct.model.config.rope_scaling == LLAMA3
    assert torch.equal(direct.model.rope_cos, run.model.rope_cos)
    idx = torch.randint(0, V, (1, 120), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(direct.model(idx)[0], run.model(idx)[0])


def _edit_config(folder, **changes):
    path = folder / "config.json"
    conf = json.loads(path.read_text(encoding="utf-8"))
    conf.update(changes)
    path.write_text(json.dumps(conf), encoding="utf-8")


@pytest.mark.parametrize("changes, needle", [
    ({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}, r"auto_map.*never runs remote code"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None},
     r"rope_scaling has no low_freq_factor"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"rope_parameters has rope_type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling has rope_type 'linear'"),
    ({"model_type": "gemma3"}, r"'gemma3' cannot be imported; moorelm imports gpt2, llama, "
                               r"mistral, qwen2, qwen3"),
    ({"head_dim": 12}, r"does not match config.json"),
], ids=["remote-code", "llama3-incomplete", "yarn-rope", "linear-rope", "architecture",
        "shape"])
def test_unsupported_folders_are_one_line(tmp_path, changes, needle):
    """Remote code, scaled rotary positions other than llama3 (naming the field and the type),
    an incomplete llama3 scaling, another architecture and weights whose shapes disagree with
    config.json are each refused in one line."""
    hf_folder(tmp_path / "hf", "qwen3")
    _edit_config(tmp_path / "hf", **changes)
    with pytest.raises(MoorelmError, match=needle) as e:
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- model fields


def test_default_config_is_unchanged_by_the_new_fields():
    """A config without the new fields derives head_dim, writes it back as null, and builds
    exactly the tensors it built before (no gains, no q/k/v-only bias)."""
    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=32, pos="rope", qk_norm=True)
    assert cfg.head_dim == 8 and cfg.to_dict()["head_dim"] is None
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    names = set(GPT(cfg).state_dict())
    assert not any("gain" in n for n in names) and "blocks.0.attn.c_attn.bias" not in names
    wide = ModelConfig(n_layer=1, n_head=4, n_embd=32, head_dim=16, qk_norm=True, qk_gain=True,
                       qkv_bias=True, pos="rope")
    assert ModelConfig.from_dict(wide.to_dict()) == wide and wide.to_dict()["head_dim"] == 16
    sd = GPT(wide).state_dict()
    assert sd["blocks.0.attn.c_attn.weight"].shape == ((4 + 8) * 16, 32)
    assert sd["blocks.0.attn.c_proj.weight"].shape == (32, 64)
    assert sd["blocks.0.attn.q_gain"].shape == (16,) and "blocks.0.attn.c_proj.bias" not in sd
    with pytest.raises(MoorelmError, match="qk_gain=True needs qk_norm=True"):
        ModelConfig(qk_gain=True)


def test_rope_scaling_field_round_trips_and_is_checked():
    """ModelConfig.rope_scaling round-trips through to_dict/from_dict (ints become floats
    where they are factors), an old config without the field reads as None, and a wrong
    scaling is one line: another rope type, a missing key, learned positions, a bad number."""
    cfg = ModelConfig(pos="rope", rope_scaling={**LLAMA3, "factor": 4})
    assert cfg.rope_scaling == LLAMA3 and isinstance(cfg.rope_scaling["factor"], float)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict()))["rope_scaling"] == LLAMA3
    old = ModelConfig(pos="rope").to_dict()
    del old["rope_scaling"]
    assert ModelConfig.from_dict(old).rope_scaling is None
    hash(cfg)  # still usable as a key
    for bad, needle in [
        ({"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' is not supported"),
        ({k: v for k, v in LLAMA3.items() if k != "factor"}, "has no factor"),
        ({**LLAMA3, "beta_fast": 32}, "unknown key"),
        ({**LLAMA3, "factor": -1.0}, "factor must be a positive number"),
        ({**LLAMA3, "original_max_position_embeddings": 64.5}, "must be a positive integer"),
        ("llama3", "must be an object or null"),
    ]:
        with pytest.raises(MoorelmError, match=needle):
            ModelConfig.from_dict({"pos": "rope", "rope_scaling": bad})
    with pytest.raises(MoorelmError, match="rope_scaling needs pos='rope'"):
        ModelConfig(rope_scaling=LLAMA3)


def test_qk_gain_backward_passes_gradcheck():
    """The hand-written backward of norm + gains + rotation agrees with finite differences
    (float64) for the input and the gains."""
    torch.manual_seed(0)
    B, T, N, D = 2, 3, 3, 8
    cos, sin = (t.double()[:T, None] for t in rope_tables(D, T, 10000.0))
    x = torch.randn(B, T, N, D, dtype=torch.float64, requires_grad=True)
    gain = (1 + 0.3 * torch.randn(N, D, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, g: _NormRotate.apply(a, g, cos, sin, True, 1e-5),
                                    (x, gain))
    assert torch.autograd.gradcheck(lambda a, g: _NormRotate.apply(a, g, None, None, True, 1e-5),
                                    (x, gain))


def test_qk_gain_gradients_match_autograd_of_a_plain_version():
    """Through a whole model, the gradients of q_gain and k_gain (and of the input) equal
    those autograd gives for the same computation written with plain torch ops."""
    cfg = ModelConfig(vocab_size=V, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, head_dim=16,
                      seq_len=16, pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True,
                      qk_gain=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, 4 + 2, 16, requires_grad=True)
    rope = (model.rope_cos[:16, None], model.rope_sin[:16, None])
    out = norm_rotate(x, rope, True, attn.qk_eps, attn.qk_gains())
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (x, attn.q_gain, attn.k_gain))

    def plain(x):
        y = torch.nn.functional.rms_norm(x, (16,), eps=attn.qk_eps)
        y = torch.cat([y[:, :, :4] * attn.q_gain, y[:, :, 4:] * attn.k_gain], dim=2)
        c, s = rope
        y1, y2 = y[..., :8], y[..., 8:]
        return torch.cat([y1 * c[..., :8] + y2 * s[..., :8], y2 * c[..., 8:] + y1 * s[..., 8:]], -1)

    ref = plain(x)
    assert (ref - out).abs().max().item() < 1e-5
    want = torch.autograd.grad((ref * w).sum(), (x, attn.q_gain, attn.k_gain))
    for got, exp in zip(grads, want):
        assert (got - exp).abs().max().item() < 1e-4


def test_decode_step_equals_forward_for_the_new_fields():
    """One-token decoding through the cache (the decode plan) gives the logits of a full
    forward pass for a model with qk_gain, qkv_bias and its own head_dim."""
    cfg = ModelConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                      seq_len=16, pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True,
                      qk_gain=True, qkv_bias=True)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        idx = torch.randint(0, V, (2, 10))
        full, _ = model(idx)
        cache = model.new_cache(2)
        model(idx[:, :9], kv_cache=cache)
        step, _ = model(idx[:, 9:], kv_cache=cache)
    assert (step[:, 0] - full[:, -1]).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- on the fly


def test_load_on_the_fly_equals_import_then_load(tmp_path):
    """moorelm.load(HF_DIR) converts in memory (no run folder written) and gives the logits
    and greedy text of importing the folder and loading the run."""
    import moorelm

    hf_folder(tmp_path / "hf", "qwen3")
    before = set((tmp_path / "hf").iterdir())
    direct = moorelm.load(tmp_path / "hf", device="cpu")
    assert set((tmp_path / "hf").iterdir()) == before
    run = moorelm.load(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu")
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(direct.model(idx)[0], run.model(idx)[0])
    assert direct.name == run.name == "hf"
    kw = dict(max_new_tokens=8, temperature=0, stop_at_eot=False)
    assert direct.complete("ROMEO:", **kw) == run.complete("ROMEO:", **kw)


def test_load_gguf_on_the_fly_equals_import_then_load(tmp_path):
    """moorelm.load(FILE.gguf) reads the file in memory (nothing written beside it) and gives
    the logits, name and stop ids of importing it and loading the run."""
    pytest.importorskip("gguf")
    import moorelm
    from moorelm.interop.gguf import import_gguf
    from tests.test_gguf import write_gguf

    path = write_gguf(tmp_path / "m.gguf", bias=True)
    direct = moorelm.load(path, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    run = moorelm.load(import_gguf(path, tmp_path / "run"), device="cpu")
    idx = torch.randint(0, direct.config.vocab_size, (2, 12),
                        generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(direct.model(idx)[0], run.model(idx)[0])
    assert direct.name == run.name and direct.stop_ids == run.stop_ids
    assert direct.meta["config"]["imported_from"]["format"] == "gguf"
    assert direct.meta["config"] == {**RunFolder(tmp_path / "run").read_config()}


def test_load_names_what_it_cannot_read(tmp_path):
    """moorelm.load of a folder that is neither a run nor a Hugging Face model keeps the run
    folder's one-line message."""
    import moorelm

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MoorelmError, match="not a moorelm run folder|no checkpoint|does not exist"):
        moorelm.load(tmp_path, device="cpu")


def test_hub_ids_come_from_the_cache_offline(tmp_path, monkeypatch, capsys):
    """An ``org/name`` that is no local path is a Hugging Face id: with HF_HUB_OFFLINE set it is
    read from the cache's snapshot folder (moorelm.load and ``moorelm import`` alike, named by
    the id, equal to loading the folder itself); an id the cache lacks is one line, exit 2."""
    import huggingface_hub.constants

    import moorelm
    from moorelm.cli import main

    cache = tmp_path / "cache"
    repo = cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    hf_folder(snapshot, "llama")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name, encoding="utf-8")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # "tiny-org/tiny-llama" is no path here

    by_id = moorelm.load("tiny-org/tiny-llama", device="cpu")
    by_folder = moorelm.load(snapshot, device="cpu")
    idx = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(by_id.model(idx)[0], by_folder.model(idx)[0])
    assert by_id.name == "tiny-org/tiny-llama"

    assert main(["import", "tiny-org/tiny-llama", str(tmp_path / "run")]) == 0
    run = moorelm.load(tmp_path / "run", device="cpu")
    with torch.no_grad():
        assert torch.equal(run.model(idx)[0], by_folder.model(idx)[0])
    capsys.readouterr()

    with pytest.raises(MoorelmError, match=r"not in the local cache \(HF_HUB_OFFLINE is set\)"):
        moorelm.load("tiny-org/missing")
    assert main(["import", "tiny-org/missing", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny-org/missing" in err
    assert not (tmp_path / "run2").exists()
