"""Weight formats for inference (moorelm.quantize): int8 per-channel, int4 group-wise, bf16."""

import copy
import subprocess
import sys

import pytest
import torch

import moorelm
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.generate import generate_tokens
from moorelm.model import GPT
from moorelm.quantize import (
    ROWS_BLOCK,
    Int4Linear,
    Int8Linear,
    Int8RowsLinear,
    quantize,
    weight_bytes,
    weight_format,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_int8_linear_is_the_dequantised_product():
    """Int8Linear computes x @ (q * scale).T (up to bf16 rounding of the activations), and
    its int8 values reconstruct the fp32 weight to within half a step per channel."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(48, 40, bias=True)
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (40,)
    step = q.scales[:, None]
    assert ((q.dequantized() - lin.weight).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(3, 5, 48)
    want = x.bfloat16().float() @ q.dequantized().T + lin.bias
    got = q(x)
    assert got.shape == (3, 5, 40) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=2e-2, rtol=1e-2)


needs_rows = pytest.mark.skipif(not Int8RowsLinear.available(),
                                reason="this PyTorch build has no fbgemm-backed embedding-bag ops")


@needs_rows
@pytest.mark.parametrize("outputs, bias", [(128, False), (40, True), (200, True)])
def test_int8_rows_linear_is_the_dequantised_product(outputs, bias):
    """Int8RowsLinear's table holds each input's run of ROWS_BLOCK outputs as 256 levels
    between the run's min and max (outputs padded to a whole block), and its product, at one
    row, two rows (one bag each) and many (the dequantised blocks), is x @ dequantised.T."""
    torch.manual_seed(5)
    lin = torch.nn.Linear(48, outputs, bias=bias)
    q = Int8RowsLinear.from_linear(lin)
    blocks = -(-outputs // ROWS_BLOCK)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (blocks * 48, ROWS_BLOCK + 8)
    w = lin.weight.detach()
    padded = torch.cat([w, w.new_zeros(blocks * ROWS_BLOCK - outputs, 48)])
    runs = padded.view(blocks, ROWS_BLOCK, 48)  # a run: one input's outputs in one block
    step = ((runs.amax(1) - runs.amin(1)) / 255)[:, None, :].expand_as(runs)
    step = step.reshape(-1, 48)[:outputs]
    assert q.dequantized().shape == (outputs, 48)
    assert ((q.dequantized() - w).abs() <= step / 2 + 1e-6).all()
    product = q.decode_product()
    for rows in (1, 2, 5):
        x = torch.randn(rows, 48)
        want = x @ q.dequantized().T + (lin.bias if bias else 0)
        assert torch.allclose(product(x), want, atol=1e-5), rows
        assert torch.allclose(q(x[None])[0], want, atol=1e-5), rows


@needs_rows
def test_int8_for_one_sequence_takes_the_row_blocks(model, monkeypatch):
    """quantize(..., batched=False), what `generate` and `chat` load, puts every int8
    projection (the LM head too, and int4's head) in Int8RowsLinear; serving's layout keeps
    Int8Linear; a build without the embedding-bag ops falls back to Int8Linear."""
    q = quantize(copy.deepcopy(model), "int8", batched=False)
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Int8RowsLinear for m in linears)
    assert weight_format(q) == "int8"
    emb = model.wte.weight.numel() * 4
    assert weight_bytes(q) < 0.35 * (weight_bytes(model) - emb) + emb + 8192
    q4 = quantize(copy.deepcopy(model), "int4", batched=False)
    assert type(q4.lm_head) is Int8RowsLinear and weight_format(q4) == "int4"
    served = quantize(copy.deepcopy(model), "int8")
    assert all(type(m) is Int8Linear for m in served.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(Int8RowsLinear, "available", staticmethod(lambda: False))
    q = quantize(copy.deepcopy(model), "int8", batched=False)
    assert all(type(m) is Int8Linear for m in q.modules() if isinstance(m, torch.nn.Linear))


def test_int4_linear_is_the_dequantised_product():
    """Int4Linear's values reconstruct the weight to within half a group step (plus bf16
    rounding), and its product is x @ dequantised.T + bias; a shape the kernel refuses (an
    output width not a multiple of 16) stays int8 under quantize."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 48, bias=True)
    q = Int4Linear.from_linear(lin, group=32)
    w = lin.weight.detach()
    groups = w.view(48, 2, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)
    err = (q.dequantized() - w).abs()
    assert (err <= step / 2 + w.abs() / 128 + 1e-3).all()
    x = torch.randn(2, 3, 64)
    want = x.bfloat16().float() @ q.dequantized().T + lin.bias
    got = q(x)
    assert got.shape == (2, 3, 48) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=3e-2, rtol=1e-2)
    assert torch.allclose(q.decode_product()(x[0]), got[0], atol=1e-5)
    odd = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 64))
    quantize(odd, "int4")
    assert type(odd[0]) is Int8Linear and type(odd[1]) is Int8Linear  # 40 outputs; 40 inputs


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("weights, tol", [("int8", 0.1), ("bf16", 0.1), ("int4", 0.5)])
def test_quantised_model_stays_close_and_decodes_like_its_forward(model, weights, tol, batched):
    """A quantised model's logits stay near fp32's, and its cached decode path computes what
    its own full forward pass computes (the decode plan calls the quantised projections), in
    the layouts for batches and for one sequence at a time alike."""
    q = quantize(copy.deepcopy(model), weights, batched=batched)
    assert weight_format(q) == weights
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    ref, _ = model(x)
    out, _ = q(x)
    assert (out.float() - ref).abs().max() < tol
    tokens = torch.stack(list(generate_tokens(q, x, 10, temperature=0.0)), 1)  # (B, 10)
    seq = x
    for i in range(10):  # greedy by full forward passes, no cache
        logits, _ = q(seq)
        nxt = logits[:, -1].float().argmax(-1)
        assert torch.equal(nxt, tokens[:, i]), f"step {i}"
        seq = torch.cat([seq, nxt[:, None]], 1)


def test_int8_holds_a_quarter_of_the_bytes(model):
    """Every projection becomes int8 (the tied head gets its own copy), so a model whose bytes
    are mostly projections shrinks to about a quarter plus the fp32 embedding."""
    q = quantize(copy.deepcopy(model), "int8")
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Int8Linear for m in linears)
    emb = model.wte.weight.numel() * 4
    assert weight_bytes(q) < 0.3 * (weight_bytes(model) - emb) + emb + 4096
    assert q.wte.weight.dtype == torch.float32


def test_bad_formats_and_requantising_are_refused(model):
    """An unknown format, and converting an already converted model, get one clear line."""
    with pytest.raises(MoorelmError, match="unknown weight format 'int3'"):
        quantize(copy.deepcopy(model), "int3")
    q = quantize(copy.deepcopy(model), "bf16")
    with pytest.raises(MoorelmError, match="already bf16"):
        quantize(q, "int8")
    assert quantize(q, "bf16") is q


PACK_MEMORY = """
import torch, moorelm.quantize as q
from moorelm.config import ModelConfig
from moorelm.model import GPT
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) << 10
q.TWIN_BYTES = 0  # as a model too big for twins
big = torch.empty(4 << 20)
del big  # freeing a 16 MiB mapping raises glibc's mmap threshold, so
# the weights below come from the heap, as a loader's do, where only a trim returns them
model = GPT(ModelConfig(vocab_size=64, seq_len=32, n_layer=8, n_head=4, n_embd=512))
projections = sum(m.weight.numel() * 4 for m in model.modules()
                  if type(m) is torch.nn.Linear and m.weight is not model.wte.weight)
before = rss()
q.quantize(model, "fp32")
assert any(type(m) is q.PackedLinear for m in model.modules())
print(rss() - before, projections)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_packing_gives_the_row_major_weights_back():
    """Packing a model too big for row-major twins leaves its resident size where it was: each
    replaced weight is freed before glibc's heap is trimmed (a list that held them all until
    after the trim kept 400 MiB of SmolLM2 resident)."""
    from moorelm.quantize import PackedLinear

    if not PackedLinear.fits(torch.nn.Linear(4, 4)):
        pytest.skip("this PyTorch build has no oneDNN")
    out = subprocess.run([sys.executable, "-c", PACK_MEMORY], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    grown, projections = (int(v) for v in out.stdout.split())
    assert grown < projections / 4, (grown, projections)

def test_load_for_one_sequence_keeps_fp32_row_major(tiny_run):
    """moorelm.load(run, batched=False), what `generate` and `chat` use, leaves fp32
    projections row-major (nothing packed) with the packed model's logits and greedy text;
    other formats are converted as usual."""
    from moorelm.quantize import PackedLinear

    one = moorelm.load(tiny_run, device="cpu", batched=False)
    many = moorelm.load(tiny_run, device="cpu")
    assert not any(type(m) is PackedLinear for m in one.model.modules())
    if PackedLinear.fits(torch.nn.Linear(4, 4)):
        assert any(type(m) is PackedLinear for m in many.model.modules())
    x = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(one.model(x)[0], many.model(x)[0], atol=1e-5)
    kw = dict(max_new_tokens=12, temperature=0.0)
    assert one.generate("RO", **kw) == many.generate("RO", **kw)
    int8 = moorelm.load(tiny_run, device="cpu", weights="int8", batched=False)
    assert weight_format(int8.model) == "int8"
    if Int8RowsLinear.available():
        assert type(int8.model.lm_head) is Int8RowsLinear
        served = moorelm.load(tiny_run, device="cpu", weights="int8")
        assert type(served.model.lm_head) is Int8Linear
        assert int8.generate("RO", **kw)  # runs; its text may differ from served's


def test_load_and_generate_with_int8_weights(tiny_run):
    """moorelm.load(run, weights="int8") and `generate --weights int8` run end to end: the
    prompt followed by the 8 new tokens the in-process int8 model produces greedily."""
    lm = moorelm.load(tiny_run, device="cpu", weights="int8")
    assert weight_format(lm.model) == "int8"
    with pytest.raises(MoorelmError, match="unknown weight format"):
        moorelm.load(tiny_run, device="cpu", weights="fp8")
    out = subprocess.run([sys.executable, "-m", "moorelm", "generate", str(tiny_run),
                          "--prompt", "RO", "--max-new-tokens", "8", "--temperature", "0",
                          "--weights", "int8", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    want = "".join(lm.generate("RO", max_new_tokens=8, temperature=0.0))
    assert out.stdout == "RO" + want + "\n"


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_decode_plan_binds_quantised_products(model, weights):
    """The decode plan holds each quantised projection as a bound product (not the module,
    whose reshapes and checks cost a step ~150 calls), and that product is the module's."""
    from moorelm.decode_plan import DecodePlan

    q = quantize(copy.deepcopy(model), weights)
    plan = DecodePlan(q)
    x = torch.randn(3, 64)
    for mod, fn in plan.linear.items():
        assert fn is not mod
        if mod.in_features == 64:
            assert torch.allclose(fn(x), mod(x), atol=1e-5)


def test_int4_keeps_the_lm_head_int8():
    """Under int4 the projections become Int4Linear but the LM head stays int8 (its int4
    error flips greedy choices), even when the kernel would take the head's shape."""
    cfg = ModelConfig(vocab_size=128, seq_len=32, n_layer=1, n_head=2, n_embd=64,
                      pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True)
    torch.manual_seed(0)
    q = quantize(GPT(cfg).eval(), "int4")
    assert type(q.lm_head) is Int8Linear and weight_format(q) == "int4"
    assert type(q.blocks[0].attn.c_attn) is Int4Linear


def test_packed_linear_is_the_same_product():
    """PackedLinear (the weight in oneDNN's blocked layout) computes what the row-major
    Linear computes, for one row, a batch and a (B, T, C) input, with its decode product
    the same; it unpacks to the exact weights, and refuses to be trained."""
    from moorelm.quantize import PackedLinear

    torch.manual_seed(4)
    for bias in (True, False):
        lin = torch.nn.Linear(96, 80, bias=bias).eval()
        if not PackedLinear.fits(lin):
            pytest.skip("this PyTorch build has no oneDNN")
        packed = PackedLinear.from_linear(lin)
        for shape in ((1, 96), (7, 96), (2, 5, 96)):
            x = torch.randn(shape)
            with torch.no_grad():
                want, got = lin(x), packed(x)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(packed.decode_product()(x[0]), want[0], atol=1e-5)
        back = packed.unpacked()
        assert type(back) is torch.nn.Linear and torch.equal(back.weight, lin.weight)
        assert (back.bias is None) == (not bias)
    with pytest.raises(MoorelmError, match="packed for inference"):
        packed(torch.randn(2, 96, requires_grad=True))



@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_product_equals_the_linear(bias):
    """The one- and two-row product over the weight's two halves equals F.linear (to float32
    rounding) with and without a bias; it declines odd row counts, non-fp32 and
    non-contiguous weights."""
    from moorelm.decode_plan import few_rows_product

    torch.manual_seed(0)
    w, b = torch.randn(96, 40), torch.randn(96) if bias else None
    product = few_rows_product(w, b)
    for rows in (1, 2):
        x = torch.randn(rows, 40)
        got, want = product(x), torch.nn.functional.linear(x, w, b)
        assert got.shape == want.shape and got.is_contiguous()
        assert torch.allclose(got, want, atol=1e-5)
    assert few_rows_product(torch.randn(95, 40), None) is None
    assert few_rows_product(w.bfloat16(), None) is None
    assert few_rows_product(torch.randn(40, 96).t(), None) is None

def test_quantize_packs_projections_and_keeps_a_tied_head_row_major(model):
    """quantize(model, "fp32") packs every projection for oneDNN but leaves a head tied to
    the embedding table as it is (one copy of those bytes); logits and greedy tokens stay
    the unpacked model's; a model this small keeps a row-major twin of each packed weight
    (counted by weight_bytes), a bigger one does not (the byte count does not grow); such a
    model still converts to int8 and bf16."""
    import moorelm.quantize as q
    from moorelm.quantize import PackedLinear

    packed = quantize(copy.deepcopy(model), "fp32")
    if not PackedLinear.fits(torch.nn.Linear(4, 4)):
        pytest.skip("this PyTorch build has no oneDNN")
    blocks = [m for m in packed.modules() if isinstance(m, torch.nn.Linear)]
    assert type(packed.lm_head) is torch.nn.Linear and packed.lm_head.weight is packed.wte.weight
    assert all(type(m) is PackedLinear for m in blocks if m is not packed.lm_head)
    twins = sum(m.dense.numel() * 4 for m in blocks if m is not packed.lm_head)
    assert twins > 0 and weight_bytes(packed) == weight_bytes(model) + twins
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(q, "TWIN_BYTES", 0)
        big = quantize(copy.deepcopy(model), "fp32")
    assert all(m.dense is None for m in big.modules() if type(m) is PackedLinear)
    assert weight_format(packed) == "fp32" and weight_bytes(big) == weight_bytes(model)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    for rows in (1, 2):  # decoding 1-2 rows reads the twin, without it the packed weight
        want = torch.stack(list(generate_tokens(big, x[:rows], 10, temperature=0.0)), 1)
        assert torch.equal(torch.stack(list(generate_tokens(packed, x[:rows], 10,
                                                            temperature=0.0)), 1), want)
    assert quantize(packed, "fp32") is packed
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(packed(x)[0], model(x)[0], atol=1e-5)
    want = torch.stack(list(generate_tokens(model, x, 10, temperature=0.0)), 1)
    assert torch.equal(torch.stack(list(generate_tokens(packed, x, 10, temperature=0.0)), 1),
                       want)
    assert weight_format(quantize(copy.deepcopy(packed), "int8")) == "int8"
    assert weight_format(quantize(copy.deepcopy(packed), "bf16")) == "bf16"
    rowmajor = quantize(copy.deepcopy(model), "fp32", batched=False)
    assert not any(type(m) is PackedLinear for m in rowmajor.modules())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_packing_replaces_the_weights_instead_of_adding_a_copy():
    """Packing a model with 96 MiB of projections leaves its resident memory about where it
    was: each packed weight replaces the row-major one, and the freed pages go back to the
    OS (glibc keeps them otherwise: +100%)."""
    code = """
import os, torch
from moorelm.config import ModelConfig
from moorelm.model import GPT
from moorelm.quantize import quantize
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
cfg = ModelConfig(vocab_size=64, seq_len=32, n_layer=4, n_head=8, n_embd=1024, mlp="swiglu",
                  pos="rope", norm="rmsnorm")
model = GPT(cfg).eval()
proj = sum(m.weight.numel() * 4 for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and n != "lm_head")
before = rss()
quantize(model, "fp32")
print(proj, rss() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    proj, grown = map(int, out.stdout.split())
    assert proj > 90 << 20
    assert grown < proj / 4, (proj, grown)


def test_a_packed_model_state_dict_is_row_major(model):
    """A packed model's state dict holds ordinary row-major tensors, equal to the model's
    before packing, and loading one into a packed model repacks it."""
    packed = quantize(copy.deepcopy(model), "fp32")
    sd, want = packed.state_dict(), model.state_dict()
    assert sd.keys() == want.keys()
    assert all(not t.is_mkldnn and torch.equal(t, want[k]) for k, t in sd.items())
    other = quantize(GPT(model.config).eval(), "fp32")
    other.load_state_dict(sd)
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.allclose(other(x)[0], model(x)[0], atol=1e-5)
