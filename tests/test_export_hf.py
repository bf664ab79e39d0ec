"""HF export: the default recipe leaves as Qwen3, chat templates, stop ids and prompt templates
travel, and an export never writes over a folder that is not one of its own."""

from __future__ import annotations

import dataclasses
import json
import string

import pytest
import torch

from moorelm.chat import DEFAULT_TEMPLATE, ChatTemplate
from moorelm.cli import main
from moorelm.codecs import LMCodec
from moorelm.config import ModelConfig, build_configs
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.run import RunFolder
from moorelm.tokenizer import EOT, Tokenizer

transformers = pytest.importorskip("transformers")

from moorelm.interop.hf import (  # noqa: E402
    export_hf,
    hf_architecture,
    import_hf,
    to_transformers,
)

SMALL = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32)
QWEN3_STYLE = dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, norm_eps=1e-6)
LLAMA_STYLE = dict(pos="rope", norm="rmsnorm", mlp="swiglu")
TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nJULIET:\nO Romeo!\n" * 5
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is Romeo?"},
    {"role": "assistant", "content": "A Montague."},
    {"role": "user", "content": "And Juliet?"},
]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _random_model(seed: int = 0, vocab_size: int = 64, **kw) -> GPT:
    """A tiny GPT with every parameter perturbed, so a dropped or swapped tensor shows."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab_size, **{**SMALL, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _make_run(path, seed: int = 0, extra: dict | None = None, **kw):
    tok = Tokenizer.train([TEXT], "char")
    model = _random_model(seed, vocab_size=tok.vocab_size, **kw)
    RunFolder(path).write_files({"model": model.config.to_dict(), **(extra or {})}, tok)
    RunFolder(path).save(3, LMCodec().checkpoint_files(model), {"tokens": 0, "elapsed": 0.0})
    return path


def _ids(rendered) -> list[int]:
    """apply_chat_template(tokenize=True)'s ids, whether it returns a list or a mapping."""
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return list(rendered)


def test_default_recipe_is_exportable():
    """The recipe moorelm trains with by default maps onto Qwen3 (no field refuses it)."""
    cfg, _ = build_configs(preset="tiny")
    assert hf_architecture(cfg) == "qwen3"


@pytest.mark.parametrize("variant", [
    dict(),
    dict(n_kv_head=1),
    dict(tie_embeddings=True, rope_base=500.0),
    dict(qkv_bias=True),
    dict(qk_gain=True),
], ids=["plain", "gqa", "tied", "qkv-bias", "qk-gain"])
def test_qwen3_logits_match_transformers(variant):
    """Rotary + RMSNorm + QK-norm + SwiGLU models equal transformers' Qwen3ForCausalLM to
    < 1e-4 (GQA, tying, rope base; q/k/v biases and learned q/k gains where ModelConfig has
    them)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if not set(variant) <= names | {"n_kv_head", "tie_embeddings", "rope_base"}:
        pytest.skip(f"ModelConfig has no {sorted(set(variant) - names)} yet")
    model = _random_model(1, **QWEN3_STYLE, **variant)
    hf = to_transformers(model)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    idx = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("variant, field", [
    (dict(QWEN3_STYLE, norm_eps=1e-5), "norm_eps"),
    (dict(QWEN3_STYLE, bias=True), "bias"),
    (dict(QWEN3_STYLE, pos="learned", norm="layernorm", mlp="gelu"), "qk_norm"),
    (dict(QWEN3_STYLE, norm="layernorm"), "norm"),
    (dict(QWEN3_STYLE, mlp="gelu"), "mlp"),
    (dict(QWEN3_STYLE, logit_softcap=30.0), "logit_softcap"),
])
def test_export_refuses_what_qwen3_cannot_compute(variant, field):
    """A model no family computes exactly is refused with one line naming the blocking field."""
    with pytest.raises(MoorelmError, match=f"cannot export: {field}="):
        hf_architecture(ModelConfig(**SMALL, **variant))


def test_trained_default_run_exports_with_same_logits_and_greedy_tokens(tmp_path, small_corpus):
    """`moorelm train --preset tiny` (the default recipe) for a few steps, exported, loads with
    AutoModelForCausalLM as Qwen3 and gives moorelm's logits (< 1e-4) and greedy tokens."""
    import moorelm

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--corpus", str(small_corpus), "--out", str(run),
                 "--max-steps", "12", "--batch-size", "8", "--eval-iters", "1",
                 "--eval-interval", "0", "--threads", "1", "--device", "cpu", "--quiet"]) == 0
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    lm = moorelm.load(run, device="cpu")
    ids = lm.tokenizer.encode("ROMEO:\nBut, soft! what light")
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (lm.model(x)[0] - hf(x).logits).abs().max().item() < 1e-4
        theirs = hf.generate(x, max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=lm.tokenizer.eot_id)[0, len(ids):].tolist()
    ours = lm.complete("ROMEO:\nBut, soft! what light", max_new_tokens=10, temperature=0,
                       stop_at_eot=False)
    assert lm.tokenizer.decode(theirs) == ours


# head size 16, base 1e4, original context 32: wavelengths 6.3 (kept), 20 (blended) and 63 and
# more (divided by 4) over 128 positions
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("style, family", [(LLAMA_STYLE, "LlamaForCausalLM"),
                                           (QWEN3_STYLE, "Qwen3ForCausalLM")],
                         ids=["llama", "qwen3"])
def test_llama3_rope_scaling_exports_and_round_trips(tmp_path, style, family):
    """A run with llama3 rope scaling exports it under both of transformers' names; the
    folder loads with AutoModelForCausalLM as the same scaled rotary model (logits within
    1e-4 over 128 positions, as does to_transformers) and imports back with the scaling."""
    run = _make_run(tmp_path / "run", seed=2, **style, seq_len=128, rope_scaling=LLAMA3)
    out = export_hf(run, tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["rope_scaling"] == LLAMA3
    assert conf["rope_parameters"] == {**LLAMA3, "rope_theta": 10000.0}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == family and hf.config.rope_parameters["rope_type"] == "llama3"
    model = RunFolder(run).load(device="cpu").model
    idx = torch.randint(0, model.config.vocab_size, (2, 128),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)[0]
        assert (ours - hf(idx).logits).abs().max().item() < 1e-4
        assert (ours - to_transformers(model)(idx).logits).abs().max().item() < 1e-4
    back = RunFolder(import_hf(out, tmp_path / "back")).read_config()["model"]
    assert back["rope_scaling"] == LLAMA3
    # Qwen3's q/k norms always import with learned gains (here ones): the one other change
    assert ModelConfig.from_dict({**back, "qk_gain": model.config.qk_gain}) == model.config


def test_gguf_export_refuses_llama3_rope_scaling():
    """GGUF export of a llama3-scaled model is refused in one line naming rope_scaling
    (llama.cpp's rope_freqs tensor is not written), not exported with plain frequencies."""
    from moorelm.interop.gguf_export import gguf_architecture

    cfg = ModelConfig(**{**SMALL, **LLAMA_STYLE, "seq_len": 128, "rope_scaling": LLAMA3})
    with pytest.raises(MoorelmError, match="cannot export to GGUF: rope_scaling 'llama3'") as e:
        gguf_architecture(cfg)
    assert "\n" not in str(e.value)


def test_trained_run_chat_template_travels(tmp_path):
    """A run trained here exports moorelm's default chat template: transformers'
    apply_chat_template renders it token for token as moorelm does; eos is <|endoftext|>."""
    run = _make_run(tmp_path / "run", **QWEN3_STYLE)
    out = export_hf(run, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(run / "tokenizer.json")
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == DEFAULT_TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_TEMPLATE
    assert tok.eos_token == tok.bos_token == EOT
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eot_id
    moorelm_text = ChatTemplate.default().render(CONVERSATION)
    for prompt in (True, False):
        text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=prompt)
        assert text == ChatTemplate.default().render(CONVERSATION, add_generation_prompt=prompt)
    ids = _ids(tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True))
    assert ids == ours.encode(moorelm_text)


def _chatml_folder(path):
    """A tiny Llama folder with a ChatML template, <|im_end|> as eos and two stop ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    specials = [EOT, "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens(specials)
    model = _random_model(4, vocab_size=len(vocab), **LLAMA_STYLE)
    to_transformers(model).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": EOT, "bos_token": None,
        "chat_template": CHATML}), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}),
                                                 encoding="utf-8")
    return path


def test_imported_chatml_template_travels_through_import_and_export(tmp_path):
    """A ChatML folder imported then exported keeps its template, special tokens and every
    stop id, and apply_chat_template renders what moorelm renders, token for token."""
    hf_dir = _chatml_folder(tmp_path / "src")
    run = import_hf(hf_dir, tmp_path / "run")
    out = export_hf(run, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == EOT
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0] and gen["pad_token_id"] == 0
    cfg = RunFolder(run).read_config()
    ours = ChatTemplate.from_config(cfg)
    ours_tok = Tokenizer.load(run / "tokenizer.json")
    for prompt in (True, False):
        theirs = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=prompt)
        assert theirs == ours.render(CONVERSATION, add_generation_prompt=prompt)
    ids = _ids(tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True))
    assert ids == ours_tok.encode(ours.render(CONVERSATION))
    assert "<|im_end|>" in ours.render(CONVERSATION)
    back = RunFolder(import_hf(out, tmp_path / "back")).read_config()
    assert back["chat"] == cfg["chat"]


def test_prompt_template_and_default_chat_survive_export_and_import(tmp_path):
    """A fine-tuned run's prompt template goes out in config.json's moorelm section and comes
    back on import; a run on moorelm's default chat template comes back on the default."""
    template = "Q: {prompt}\nA: "
    run = _make_run(tmp_path / "run", extra={"prompt_template": template}, **LLAMA_STYLE)
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["moorelm"]["prompt_template"] == template
    back = RunFolder(import_hf(out, tmp_path / "back")).read_config()
    assert back["prompt_template"] == template
    assert back["chat"]["template"] is None
    assert ChatTemplate.from_config(back) == ChatTemplate.default()


def test_export_refuses_existing_paths_and_never_deletes_foreign_files(tmp_path):
    """An existing export is replaced only with overwrite; a folder holding anything an export
    does not write, or a file, is refused even with overwrite and left as it was."""
    run = _make_run(tmp_path / "run", **QWEN3_STYLE)
    out = export_hf(run, tmp_path / "hf")
    with pytest.raises(MoorelmError, match="already exists"):
        export_hf(run, out)
    (out / "model.safetensors").write_bytes(b"stale")
    export_hf(run, out, overwrite=True)
    assert (out / "model.safetensors").stat().st_size > 100
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    for flag in (False, True):
        with pytest.raises(MoorelmError):
            export_hf(run, mine, overwrite=flag)
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "keep me"
    (out / "notes.txt").write_text("mine now", encoding="utf-8")
    with pytest.raises(MoorelmError, match="notes.txt.*not a moorelm export"):
        export_hf(run, out, overwrite=True)
    assert (out / "notes.txt").exists()
    plain = tmp_path / "config-only"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(MoorelmError, match="no config.json of ours"):
        export_hf(run, plain, overwrite=True)
    afile = tmp_path / "file"
    afile.write_text("x", encoding="utf-8")
    with pytest.raises(MoorelmError, match="not a folder"):
        export_hf(run, afile, overwrite=True)
    assert afile.read_text(encoding="utf-8") == "x"


def test_export_of_a_run_without_checkpoint_is_one_line(tmp_path):
    """A run folder with no checkpoint is refused with a MoorelmError, and nothing is written."""
    tok = Tokenizer.train([TEXT], "char")
    RunFolder(tmp_path / "run").write_files(
        {"model": ModelConfig(vocab_size=tok.vocab_size, **SMALL, **QWEN3_STYLE).to_dict()}, tok)
    with pytest.raises(MoorelmError):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
