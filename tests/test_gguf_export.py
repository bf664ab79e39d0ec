"""GGUF export: tiny runs written as GGUF files must be read by transformers' GGUF loader with
moorelm's logits, and come back through ``moorelm import`` as the same model and tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from moorelm.chat import DEFAULT_TEMPLATE  # noqa: E402
from moorelm.cli import main  # noqa: E402
from moorelm.codecs import LMCodec  # noqa: E402
from moorelm.config import ModelConfig  # noqa: E402
from moorelm.errors import MoorelmError  # noqa: E402
from moorelm.interop import gguf as gguf_import  # noqa: E402
from moorelm.interop.gguf import import_gguf  # noqa: E402
from moorelm.interop.gguf_export import export_gguf, gguf_architecture  # noqa: E402
from moorelm.model import GPT  # noqa: E402
from moorelm.run import RunFolder  # noqa: E402
from moorelm.tokenizer import Tokenizer  # noqa: E402

from .test_gguf import TEMPLATE, TEXTS, _sentencepiece_gguf, write_gguf  # noqa: E402

TEXT = ("ROMEO:\nBut, soft! what light through yonder window breaks? 12345 67\n"
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? ünïcödé 北京\n") * 10
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_layer=2, n_head=4, n_kv_head=2,
             n_embd=64, seq_len=32)
# transformers' GGUF loader reads no head size for qwen3 and takes Qwen3Config's 128
QWEN3 = dict(LLAMA, qk_norm=True, norm_eps=1e-6, n_head=2, n_kv_head=1, n_embd=256)
VARIANTS = {
    "llama-gqa-untied": dict(LLAMA, tie_embeddings=False),
    "llama-tied": dict(LLAMA, n_kv_head=None, rope_base=500.0, norm_eps=1e-6),
    "qwen3": dict(QWEN3, tie_embeddings=False),
    "qwen2-qkv-bias": dict(LLAMA, bias=True),
}


def _bpe() -> Tokenizer:
    return Tokenizer.train([TEXT], "bpe", vocab_size=300)


def _make_run(path, tokenizer: Tokenizer | None = None, seed: int = 0, **kw):
    """A run folder holding a random model whose every parameter is perturbed (a swapped,
    transposed or unpermuted tensor shows in the logits). With bias=True only the q/k/v
    biases are non-zero (the qwen2 shape)."""
    tok = tokenizer or _bpe()
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
            if name.endswith(".bias") and not name.endswith("c_attn.bias"):
                p.zero_()
    RunFolder(path).write_files({"model": model.config.to_dict()}, tok)
    RunFolder(path).save(3, LMCodec().checkpoint_files(model), {"tokens": 0, "elapsed": 0.0})
    return path


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _ours(run, idx) -> torch.Tensor:
    with torch.no_grad():
        return RunFolder(run).load().model(idx)[0]


def _theirs(path, idx) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_logits_equal_transformers_gguf_loader(tmp_path, variant):
    """An f32 export read by transformers' own GGUF loader computes moorelm's logits
    (< 1e-4): q/k rows permuted for llama, not for qwen2/qwen3, QK-norm gains, q/k/v biases,
    tied and untied heads, grouped-query attention, rotary base and norm epsilon all land."""
    run = _make_run(tmp_path / "run", **VARIANTS[variant])
    info = export_gguf(run, tmp_path / "m.gguf")
    assert info["architecture"] == variant.split("-")[0]
    idx = _ids(300)
    ours, theirs = _ours(run, idx), _theirs(tmp_path / "m.gguf", idx)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype, bound", [("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 1e-1)])
def test_lower_precision_logits_are_bounded(tmp_path, dtype, bound):
    """f16, bf16 and q8_0 files are smaller than f32 and their logits stay within a bound
    relative to the logits' range (printed: the figure docs/interop.md reports)."""
    run = _make_run(tmp_path / "run", **VARIANTS["llama-gqa-untied"])
    f32 = export_gguf(run, tmp_path / "f32.gguf")
    info = export_gguf(run, tmp_path / f"{dtype}.gguf", dtype=dtype)
    assert info["bytes"] < f32["bytes"]
    idx = _ids(300)
    ours, theirs = _ours(run, idx), _theirs(tmp_path / f"{dtype}.gguf", idx)
    rel = (ours - theirs).abs().max().item() / ours.abs().max().item()
    print(f"{dtype}: max |diff| / max |logit| = {rel:.2e}")
    assert 0 < rel < bound


def test_import_of_the_export_is_the_same_model(tmp_path):
    """moorelm import of an exported BPE run gives back the same logits, the same token ids
    for every text, and the run's chat template; the metadata says what the run is."""
    run = _make_run(tmp_path / "run", **VARIANTS["llama-gqa-untied"])
    path = export_gguf(run, tmp_path / "m.gguf")["path"]
    back = import_gguf(path, tmp_path / "back")
    idx = _ids(300)
    assert (_ours(run, idx) - _ours(back, idx)).abs().max().item() < 1e-5
    a, b = Tokenizer.load(run / "tokenizer.json"), Tokenizer.load(back / "tokenizer.json")
    for text in [*TEXTS, TEXT]:
        assert a.encode(text) == b.encode(text), text
    meta = gguf_import.read_gguf(path, weights=False)
    assert meta.special["bos"] == meta.special["eos"] == a.eot_id
    assert json.loads(meta.files["tokenizer_config.json"])["chat_template"] == DEFAULT_TEMPLATE
    reader = gguf.GGUFReader(path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("llama.context_length") == 32 and field("llama.rope.freq_base") == 10000.0
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def test_transformers_gguf_tokenizer_encodes_like_moorelm(tmp_path):
    """transformers' tokenizer built from the exported metadata gives moorelm's token ids."""
    run = _make_run(tmp_path / "run", **VARIANTS["llama-tied"])
    export_gguf(run, tmp_path / "m.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ours = Tokenizer.load(run / "tokenizer.json")
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, text


def test_qwen3_import_of_the_export(tmp_path):
    """A QK-norm (qwen3) export imports back to the same logits."""
    run = _make_run(tmp_path / "run", **VARIANTS["qwen3"])
    back = import_gguf(export_gguf(run, tmp_path / "m.gguf")["path"], tmp_path / "back")
    idx = _ids(300)
    assert (_ours(run, idx) - _ours(back, idx)).abs().max().item() < 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_an_imported_gguf_model_round_trips(tmp_path, tied):
    """A GGUF model imported, exported and imported again computes the same logits, encodes
    every text alike, and keeps its chat template and special token ids."""
    src = write_gguf(tmp_path / "src.gguf", tied=tied)
    first = import_gguf(src, tmp_path / "first")
    out = export_gguf(first, tmp_path / "out.gguf")["path"]
    again = import_gguf(out, tmp_path / "again")
    idx = _ids(300)
    assert (_ours(first, idx) - _ours(again, idx)).abs().max().item() < 1e-5
    assert (_ours(first, idx) - _theirs(tmp_path / "out.gguf", idx)).abs().max().item() < 1e-4
    a, b = Tokenizer.load(first / "tokenizer.json"), Tokenizer.load(again / "tokenizer.json")
    for text in TEXTS:
        assert a.encode(text) == b.encode(text), text
    orig, back = gguf_import.read_gguf(src, weights=False), gguf_import.read_gguf(out, weights=False)
    assert json.loads(back.files["tokenizer_config.json"])["chat_template"] == TEMPLATE
    assert {k: back.special[k] for k in ("bos", "eos", "pad")} == \
        {k: orig.special[k] for k in ("bos", "eos", "pad")}
    assert RunFolder(again).chat_settings()["stop_ids"] == RunFolder(first).chat_settings()["stop_ids"]


def test_a_sentencepiece_import_round_trips(tmp_path):
    """A SentencePiece-style ('llama' vocabulary) import exports as one (tokens, scores,
    merges) and imports back with the same ids and logits."""
    src = _sentencepiece_gguf(tmp_path / "sp.gguf")
    with pytest.warns(UserWarning):
        first = import_gguf(src, tmp_path / "first")
    out = export_gguf(first, tmp_path / "out.gguf")["path"]
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.model"].contents() == "llama"
    again = import_gguf(out, tmp_path / "again")
    a, b = Tokenizer.load(first / "tokenizer.json"), Tokenizer.load(again / "tokenizer.json")
    for text in [*TEXTS, "  two  spaces"]:
        assert a.encode(text) == b.encode(text), text
    idx = _ids(200)
    assert (_ours(first, idx) - _ours(again, idx)).abs().max().item() < 1e-5


@pytest.mark.parametrize("change, needle", [
    (dict(pos="learned", norm="layernorm", mlp="gelu"), "pos='learned'"),
    (dict(norm="layernorm"), "norm='layernorm'"),
    (dict(mlp="relu2"), "mlp='relu2'"),
    (dict(logit_softcap=30.0), "logit_softcap"),
    (dict(qk_norm=True, norm_eps=1e-5), "norm_eps=1e-05"),
])
def test_configs_without_an_exact_counterpart_are_refused(change, needle):
    """Export never approximates: each field with no llama/qwen2/qwen3 counterpart is named."""
    cfg = ModelConfig(**{**LLAMA, **change})
    with pytest.raises(MoorelmError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        gguf_architecture(cfg)


def test_biases_outside_qkv_are_refused(tmp_path):
    """A non-zero MLP bias has no place in llama.cpp's llama/qwen2/qwen3: refused, named."""
    model = GPT(ModelConfig(vocab_size=64, **LLAMA, bias=True))
    with pytest.raises(MoorelmError, match="mlp.c_fc.bias"):
        gguf_architecture(model.config, {k: v.fill_(k.endswith("mlp.c_fc.bias"))
                                         for k, v in model.state_dict().items()})


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("moorelm: error: "), err
    return err


def test_character_level_runs_are_refused_in_one_line(tmp_path, capsys):
    """moorelm's character tokenizer has no GGUF form: one line saying so, no file written."""
    run = _make_run(tmp_path / "run", Tokenizer.train([TEXT], "char"), **LLAMA)
    err = _cli_error(["export", str(run), str(tmp_path / "m.gguf"), "--format", "gguf"], capsys)
    assert "character-level" in err and not (tmp_path / "m.gguf").exists()


def test_cli_exports_and_refuses_to_overwrite(tmp_path, capsys):
    """The CLI writes the file and names it; a second export needs --force, which replaces
    a GGUF file but never a file of the user's; an unknown dtype is one line."""
    run = _make_run(tmp_path / "run", **LLAMA)
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), str(out), "--format", "gguf", "--dtype", "q8_0"]) == 0
    assert "q8_0" in capsys.readouterr().out and out.read_bytes()[:4] == b"GGUF"
    assert "already exists" in _cli_error(["export", str(run), str(out), "--format", "gguf"], capsys)
    assert main(["export", str(run), str(out), "--format", "gguf", "--force"]) == 0
    capsys.readouterr()
    mine = tmp_path / "notes.gguf"
    mine.write_text("my notes")
    assert "not a GGUF file" in _cli_error(["export", str(run), str(mine), "--format", "gguf",
                                            "--force"], capsys)
    assert mine.read_text() == "my notes"
    assert "q4_k" in _cli_error(["export", str(run), str(out), "--format", "gguf", "--dtype",
                                 "q4_k"], capsys)
    assert not list(tmp_path.glob(".*.tmp"))


def test_q8_0_keeps_rows_it_cannot_block_in_f16(tmp_path):
    """Rows whose length is not a multiple of 32 stay F16 in a q8_0 file (and still load)."""
    run = _make_run(tmp_path / "run", **dict(LLAMA, n_embd=48, n_head=2, n_kv_head=None))
    path = export_gguf(run, tmp_path / "m.gguf", dtype="q8_0")["path"]
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    idx = _ids(300)
    assert np.isfinite(_theirs(tmp_path / "m.gguf", idx).numpy()).all()
