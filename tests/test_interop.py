"""Hugging Face interop: export to / import from transformers GPT-2 and Llama folders (Qwen3:
tests/test_export_hf.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moorelm.cli import main
from moorelm.codecs import LMCodec
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.run import RunFolder
from moorelm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

from moorelm.interop.hf import (  # noqa: E402
    export_hf,
    hf_architecture,
    import_hf,
    to_transformers,
)

SMALL = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32)
GPT2_STYLE = dict(pos="learned", norm="layernorm", mlp="gelu")
LLAMA_STYLE = dict(pos="rope", norm="rmsnorm", mlp="swiglu")
TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nJULIET:\nO Romeo!\n" * 5


def _random_model(seed: int = 0, vocab_size: int = 64, **kw) -> GPT:
    """A tiny GPT whose every parameter (norm gains and biases too) is perturbed, so a
    mapping that swaps, transposes or drops a tensor shows up in the logits."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab_size, **SMALL, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _make_run(path, seed: int = 0, **kw):
    """A run folder holding a random model and a char tokenizer (no training needed)."""
    tok = Tokenizer.train([TEXT], "char")
    model = _random_model(seed, vocab_size=tok.vocab_size, **kw)
    RunFolder(path).write_files({"model": model.config.to_dict()}, tok)
    RunFolder(path).save(7, LMCodec().checkpoint_files(model), {"tokens": 0, "elapsed": 0.0})
    return path


def _greedy(run, prompt: str = "ROMEO:", n: int = 12) -> str:
    import moorelm

    return moorelm.load(run, device="cpu").complete(prompt, max_new_tokens=n, temperature=0,
                                                   stop_at_eot=False)


@pytest.mark.parametrize("variant", [
    dict(GPT2_STYLE),
    dict(GPT2_STYLE, bias=True, tie_embeddings=False, mlp_hidden=48),
    dict(LLAMA_STYLE, n_kv_head=1, tie_embeddings=False),
    dict(LLAMA_STYLE, bias=True, rope_base=500.0, norm_eps=1e-6),
], ids=["gpt2", "gpt2-bias-untied", "llama-gqa", "llama-bias-tied"])
def test_logits_match_transformers(variant):
    """moorelm's logits and the converted transformers model's agree to < 1e-4 (float32) on
    random inputs, for GPT-2 and Llama variants (biases, tying, GQA, rope base, eps)."""
    model = _random_model(1, **variant)
    hf = to_transformers(model)
    assert type(hf).__name__ == ("GPT2LMHeadModel" if variant["pos"] == "learned" else "LlamaForCausalLM")
    idx = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant, field", [
    (dict(pos="rope", norm="rmsnorm", mlp="relu2"), "mlp"),
    (dict(LLAMA_STYLE, qk_norm=True), "norm_eps"),  # Qwen3's one eps for norms and QK-norm
    (dict(GPT2_STYLE, qk_norm=True), "qk_norm"),
    (dict(pos="rope", norm="layernorm", mlp="swiglu"), "norm"),
    (dict(GPT2_STYLE, n_kv_head=1), "n_kv_head"),
    (dict(GPT2_STYLE, logit_softcap=30.0), "logit_softcap"),
])
def test_export_refuses_configs_without_counterpart(variant, field):
    """Configs outside both families raise MoorelmError naming the field that prevents it."""
    with pytest.raises(MoorelmError, match=field):
        hf_architecture(ModelConfig(**SMALL, **variant))


def test_export_loads_with_auto_classes_and_pipeline(tiny_run, tmp_path):
    """An exported trained run loads with AutoModelForCausalLM/AutoTokenizer, tokenizes and
    decodes like moorelm, and pipeline('text-generation') greedily continues as moorelm does."""
    out = export_hf(tiny_run, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(tiny_run / "tokenizer.json")
    text = "JULIET:\nO Romeo, café 😀"
    assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ours.eot_id
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    got = pipe("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert got == "ROMEO:" + _greedy(tiny_run, n=8)


@pytest.mark.parametrize("variant", [dict(GPT2_STYLE), dict(LLAMA_STYLE, n_kv_head=1, tie_embeddings=False)],
                         ids=["gpt2", "llama"])
def test_export_import_round_trip(tmp_path, variant):
    """export then import gives the same config, bit-identical weights and the same greedy text."""
    run = _make_run(tmp_path / "run", **variant)
    export_hf(run, tmp_path / "hf")
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    a, b = RunFolder(run).load(), RunFolder(back).load()
    m1, c1, m2, c2 = a.model, a.config, b.model, b.config
    assert c1["model"] == c2["model"]
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert _greedy(run) == _greedy(back)


def test_import_transformers_gpt2_with_biases(tmp_path):
    """A GPT-2 saved by transformers itself (non-zero biases, untied head) imports into a
    moorelm run whose logits match the original's."""
    conf = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                   activation_function="gelu", tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(conf).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(Tokenizer.train([TEXT]).to_json(), encoding="utf-8")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    loaded = RunFolder(run).load()
    model, cfg = loaded.model, loaded.config
    assert cfg["model"]["bias"] is True and cfg["model"]["tie_embeddings"] is False
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_import_renames_llama_style_eos(tmp_path):
    """A tokenizer whose end-of-sequence token is '</s>' imports with that token renamed to
    <|endoftext|> (same id); without any end-of-sequence token the import fails clearly."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    model = _random_model(2, vocab_size=40, **LLAMA_STYLE)
    hf_dir = tmp_path / "hf"
    to_transformers(model).save_pretrained(hf_dir)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefgh ")}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(hf_dir / "tokenizer.json"))
    with pytest.raises(MoorelmError, match=re.escape("no <|endoftext|> token")):
        import_hf(hf_dir, tmp_path / "run0")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}), encoding="utf-8")
    with pytest.warns(UserWarning, match="renamed"):
        run = import_hf(hf_dir, tmp_path / "run", seq_len=16)
    loaded = Tokenizer.load(run / "tokenizer.json")
    assert loaded.eot_id == 2 and loaded.encode("abc") == [3, 4, 5]
    assert RunFolder(run).read_config()["model"]["seq_len"] == 16


def test_import_refuses_pickled_weights(tmp_path):
    """A folder with only pytorch_model.bin is refused with a clear error (never unpickled)."""
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}), encoding="utf-8")
    (hf_dir / "pytorch_model.bin").write_bytes(b"not a pickle; must never be read")
    with pytest.raises(MoorelmError, match="pytorch_model.bin"):
        import_hf(hf_dir, tmp_path / "run")


def test_import_refuses_other_architectures(tmp_path):
    """A model_type outside the importable families is refused by name, listing them."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}), encoding="utf-8")
    with pytest.raises(MoorelmError, match="'gemma2'.*gpt2, llama, mistral, qwen2, qwen3"):
        import_hf(tmp_path, tmp_path / "run")


def test_cli_export_and_import(tmp_path, capsys):
    """The export/import verbs round-trip a run; bad input exits 2 with a one-line error."""
    run = _make_run(tmp_path / "run", **GPT2_STYLE)
    assert main(["export", str(run), "--format", "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["export", str(run), str(tmp_path / "hf")]) == 2  # not empty
    assert main(["export", str(run), "--format", "onnx", str(tmp_path / "x")]) == 2
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    err = capsys.readouterr().err
    assert err.count("moorelm: error:") == 2 and "onnx" in err
    assert _greedy(tmp_path / "back") == _greedy(run)
    relu = _make_run(tmp_path / "relu", pos="rope", norm="rmsnorm", mlp="relu2")
    assert main(["export", str(relu), str(tmp_path / "hf2")]) == 2
    assert "mlp" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


# ----------------------------------------------------------------------------- hostile folders


def _shard(hf_dir, target: str) -> None:
    """Replace model.safetensors by an index naming ``target`` for every tensor."""
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, target)}))


def test_sharded_index_names_only_files_of_its_folder(tmp_path):
    """A sharded index naming a file in the folder imports; one naming '../x', an absolute
    path or a file behind a linked folder (all real weight files) is refused in one line, and
    nothing is imported."""
    import shutil

    run = _make_run(tmp_path / "run", **GPT2_STYLE)
    export_hf(run, tmp_path / "hf")
    ok = tmp_path / "ok"
    shutil.copytree(tmp_path / "hf", ok)
    _shard(ok, "model-00001-of-00001.safetensors")
    (ok / "model.safetensors").rename(ok / "model-00001-of-00001.safetensors")
    import_hf(ok, tmp_path / "back")
    assert _greedy(tmp_path / "back") == _greedy(run)
    for name, target in [("dot-dot", "../outside.safetensors"),
                         ("absolute", str(tmp_path / "hf" / "model.safetensors")),
                         ("linked-folder", "up/outside.safetensors")]:
        bad = tmp_path / name / "hf"
        shutil.copytree(tmp_path / "hf", bad)
        _shard(bad, target)
        (bad / "model.safetensors").rename(bad.parent / "outside.safetensors")
        (bad / "up").symlink_to(bad.parent, target_is_directory=True)
        with pytest.raises(MoorelmError, match="may only name files in its own folder") as e:
            import_hf(bad, tmp_path / name / "run")
        assert "\n" not in str(e.value)
        assert not (tmp_path / name / "run").exists()


@pytest.mark.parametrize("change,needle", [
    ({"num_hidden_layers": None}, "has no num_hidden_layers"),
    ({"hidden_size": [32]}, "hidden_size must be a positive integer, got list"),
    ({"num_attention_heads": {"a": 2}}, "num_attention_heads must be a positive integer"),
    ({"num_key_value_heads": 1.5}, "num_key_value_heads must be a positive integer"),
    ({"max_position_embeddings": True}, "max_position_embeddings must be a positive integer"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": -1, "rope_parameters": None}, "rope_theta must be a positive number"),
    ({"rope_parameters": [1]}, "rope_parameters must be an object"),
    ({"attention_bias": "no"}, "attention_bias must be true or false"),
    ({"max_position_embeddings": 10**12}, "rotary tables"),
], ids=["no-layers", "width-list", "heads-object", "kv-float", "context-bool", "eps-zero",
        "theta-negative", "rope-list", "bias-string", "context-huge"])
def test_llama_config_fields_are_checked(tmp_path, change, needle):
    """Each Llama config field of the wrong type or range is one line naming the field (the
    rotary context too: no rotary table larger than the weights is allocated)."""
    run = _make_run(tmp_path / "run", **LLAMA_STYLE)
    hf_dir = export_hf(run, tmp_path / "hf")
    conf = json.loads((hf_dir / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            conf.pop(k)
        else:
            conf[k] = v
    (hf_dir / "config.json").write_text(json.dumps(conf))
    with pytest.raises(MoorelmError, match=re.escape(needle)) as e:
        import_hf(hf_dir, tmp_path / "back")
    assert "\n" not in str(e.value)
