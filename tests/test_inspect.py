"""moorelm.inspect: per-token probabilities, attention weights and the logit lens, checked
against the model's own computation (the real attention output, evaluate's scores), on
every architecture variant; the command line's files and one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from moorelm.cli import main
from moorelm.config import ModelConfig
from moorelm.corpus import load_corpus
from moorelm.errors import MoorelmError
from moorelm.evaluate import evaluate
from moorelm.generate import LanguageModel
from moorelm.inspect import (
    html_page,
    inspect,
    lens_table,
    save_attention_png,
    save_html,
    save_lens_png,
    terminal,
    trace,
)
from moorelm.model import GPT
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT

VARIANTS = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "rope-rms-gqa": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1),
    "qk-norm": dict(pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, n_kv_head=2,
                    logit_softcap=15.0),
    "learned-qk-untied": dict(pos="learned", norm="layernorm", qk_norm=True,
                              tie_embeddings=False),
    # Qwen3's shape: learned QK-norm gains, q/k/v biases, a head width of its own
    "qwen3-gains": dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, qk_gain=True,
                        qkv_bias=True, head_dim=16, n_kv_head=2),
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([SMALL_TEXT], "char")


def tiny(tok, seed: int = 0, **variant) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, seq_len=48, n_layer=2, n_head=4, n_embd=32,
                      init_std=0.2, **variant)
    model = GPT(cfg).eval()
    if cfg.qk_gain:  # gains and biases away from their initial ones and zeros
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_attention_weights_are_the_ones_the_model_used(tok, variant):
    """Rebuilding each attention layer's output from the returned weights and the values
    (weights @ values, per query head, through the output projection) gives the output the
    model's own attention layer (scaled_dot_product_attention) produced; the traced logits
    equal forward's."""
    model = tiny(tok, **VARIANTS[variant])
    ids = tok.encode("ROMEO:\nBut, soft! what light")
    real = {}
    hooks = [b.attn.register_forward_hook(lambda m, a, out, i=i: real.__setitem__(i, out[0]))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    tr = trace(model, ids, keep_values=True)
    cfg = model.config
    H, K, D, T = cfg.n_head, cfg.kv_heads, cfg.head_dim, len(ids)
    for i, block in enumerate(model.blocks):
        w = tr.attention[i]  # (H, T, T)
        assert w.shape == (H, T, T)  # one map per query head, GQA included
        assert torch.allclose(w.sum(-1), torch.ones(H, T), atol=1e-5)
        assert bool((w.triu(1) == 0).all())  # causal
        v = tr.values[i].repeat_interleave(H // K, dim=0)  # (H, T, D)
        y = (w @ v).transpose(0, 1).reshape(T, H * D)
        with torch.no_grad():
            rebuilt = block.attn.c_proj(y)
        assert torch.allclose(rebuilt, real[i], atol=1e-5), (variant, i)
    assert torch.allclose(tr.logits, logits[0], atol=1e-4)


def test_token_logprobs_equal_evaluate(tok, tmp_path):
    """Every token's log-probability from inspect is what evaluate's per-token scoring
    (forward with targets, loss_reduction='none') gives it, and their mean over the text
    plus its end-of-text token is evaluate's loss."""
    model = tiny(tok, seed=3, pos="rope", norm="rmsnorm", n_kv_head=2)
    text = "JULIET:\nO Romeo, wherefore art thou?"
    ids = tok.encode(text) + [tok.eot_id]
    result = inspect(model, tok, ids, top_k=3)
    mine = torch.tensor([t.logprob for t in result.tokens[1:]])
    with torch.no_grad():
        _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), loss_reduction="none")
    assert torch.allclose(mine, -loss[0], atol=1e-4)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    ev = evaluate(LanguageModel(model, tok), load_corpus(str(path)), progress=False)
    assert ev["tokens"] == len(ids) - 1
    assert math.isclose(-float(mine.mean()), ev["loss"], rel_tol=1e-4)
    for t in result.tokens[1:]:  # rank and alternatives agree with the probabilities
        assert t.top[0][2] >= t.logprob - 1e-6
        assert (t.rank == 1) == (t.top[0][1] == t.id)
        assert 0 < t.prob <= 1


@pytest.mark.parametrize("variant", ["gpt2", "rope-rms-gqa"])
def test_logit_lens_last_row_is_the_output(tok, variant):
    """The logit lens has a row per residual stream (embeddings + each layer); its last row
    is the model's own prediction, and its probabilities are probabilities."""
    model = tiny(tok, **VARIANTS[variant])
    result = inspect(model, tok, "ROMEO:\nBut", top_k=2)
    T = len(result.tokens)
    assert result.lens_ids.shape == (model.config.n_layer + 1, T)
    assert result.lens_ids[-1].tolist() == [t.top[0][1] for t in result.tokens[1:]] + \
        [result.next_top[0][1]]
    assert bool((result.lens_probs <= 1).all() and (result.lens_final <= result.lens_probs + 1e-6).all())
    table = lens_table(result)
    assert table.splitlines()[1].strip().startswith("embed")


def test_continuation_is_scored_and_marked(tok):
    """With max_new_tokens the greedy continuation is appended, marked as generated, and
    scored like the prompt (greedy tokens have rank 1)."""
    model = tiny(tok, seed=1)
    result = inspect(model, tok, "ROMEO:", max_new_tokens=5, stop_at_eot=False)
    gen = [t for t in result.tokens if t.generated]
    assert len(gen) == 5 and result.prompt_tokens == len(tok.encode("ROMEO:"))
    assert all(t.rank == 1 for t in gen)


def test_views_render(tok, tmp_path):
    """The terminal view colours with ANSI codes (or brackets without), the HTML page is
    self-contained (data, script, inlined PNGs, no external URL) and the PNGs are PNGs."""
    model = tiny(tok, n_kv_head=2, pos="rope", norm="rmsnorm")
    result = inspect(model, tok, "O Romeo", max_new_tokens=3)
    assert "\x1b[48;5;" in terminal(result)
    assert "[O]" in terminal(result, colour=False)
    page = html_page(result)
    assert '<script type="application/json" id="data">' in page and "http" not in page
    out = save_html(result, tmp_path / "i.html")
    assert "data:image/png;base64," in out.read_text()
    png = save_attention_png(result, tmp_path / "a.png", layer=1)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert save_lens_png(result, tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(MoorelmError, match="already exists"):
        save_lens_png(result, tmp_path / "l.png")


def test_bad_input_is_one_clear_error(tok):
    """A prompt beyond the context window is refused with the way out named, and truncated
    on request; unknown layers and heads are named with the valid range."""
    model = tiny(tok)
    long = "ROMEO: " * 20  # 140 tokens > 48
    with pytest.raises(MoorelmError, match="context window.*truncate"):
        inspect(model, tok, long)
    result = inspect(model, tok, long, truncate=True, max_new_tokens=2, stop_at_eot=False)
    assert len(result.tokens) == 48 and result.truncated == len(tok.encode(long)) - 46
    with pytest.raises(MoorelmError, match="layer 7 does not exist"):
        inspect(model, tok, "ROMEO", layers=[7])
    short = inspect(model, tok, "ROMEO", layers=[1])
    with pytest.raises(MoorelmError, match="head 4 does not exist"):
        short.attention_map(1, 4)
    with pytest.raises(MoorelmError, match="was not kept"):
        short.attention_map(0)
    with pytest.raises(MoorelmError, match="empty"):
        inspect(model, tok, "")


def test_language_model_method(tok):
    """LanguageModel.inspect is moorelm.inspect.inspect on its model and tokenizer."""
    model = tiny(tok)
    lm = LanguageModel(model, tok)
    a, b = lm.inspect("ROMEO:"), inspect(model, tok, "ROMEO:")
    assert [t.logprob for t in a.tokens] == [t.logprob for t in b.tokens]


def test_cli_writes_files_and_refuses_bad_input(tiny_run, tmp_path, capsys):
    """`moorelm inspect RUN --prompt` prints the table; --html/--attention-png/--lens-png
    write their files; an existing output, an unknown layer or head and a prompt beyond the
    context exit 2 with one line."""
    html = tmp_path / "o.html"
    code = main(["inspect", str(tiny_run), "--prompt", "ROMEO:", "--max-new-tokens", "3",
                 "--html", str(html), "--attention-png", str(tmp_path / "a.png"),
                 "--lens-png", str(tmp_path / "l.png"), "--lens", "--color", "never"])
    out = capsys.readouterr().out
    assert code == 0 and "top alternatives" in out and "embed" in out
    assert html.exists() and (tmp_path / "a.png").exists() and (tmp_path / "l.png").exists()
    for argv, message in [
        (["--html", str(html)], "already exists"),
        (["--layer", "9"], "layer 9 does not exist"),
        (["--head", "9"], "head 9 does not exist"),
        (["--prompt", "ROMEO " * 40], "--truncate"),
    ]:
        base = ["inspect", str(tiny_run), "--prompt", "ROMEO:"]
        assert main(base + argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["inspect", str(tiny_run), "--prompt", "ROMEO " * 40, "--truncate",
                 "--color", "never", "--no-table"]) == 0


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_attention_and_scores_match_transformers(tmp_path, variant):
    """On a model imported from the Hugging Face format (SmolLM2's architecture: rotary,
    RMSNorm, SwiGLU, grouped-query attention; and GPT-2's), inspect's attention weights
    equal the ones transformers' eager attention returns, and its log-probabilities equal
    transformers' log-softmax."""
    pytest.importorskip("transformers")
    import moorelm
    from moorelm.interop.hf import import_hf, to_transformers

    tok = Tokenizer.train([SMALL_TEXT], "char")
    kw = (dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=True)
          if variant == "llama" else dict(pos="learned", norm="layernorm", mlp="gelu", bias=True))
    model = tiny(tok, seed=5, **kw)
    hf_dir = tmp_path / "hf"
    hf = to_transformers(model)
    hf.save_pretrained(hf_dir)
    tok.hf.save(str(hf_dir / "tokenizer.json"))
    run = import_hf(hf_dir, tmp_path / "run")
    lm = moorelm.load(run, device="cpu")
    ids = tok.encode("ROMEO:\nBut, soft")
    result = lm.inspect(ids, top_k=1)
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True)
    for layer, theirs in enumerate(out.attentions):
        assert torch.allclose(result.attention[layer], theirs[0], atol=1e-5), layer
    lp = torch.log_softmax(out.logits[0], dim=-1)
    mine = torch.tensor([t.logprob for t in result.tokens[1:]])
    assert torch.allclose(mine, lp[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4)
