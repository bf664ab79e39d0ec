"""The continuous-batching engine: batched equals alone, joining and leaving, sampling
settings, stop sequences, cancellation and the bounded queue."""

from __future__ import annotations

import time

import pytest
import torch

import moorelm
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.generate import SamplingParams, generate_tokens
from moorelm.inference.engine import Engine
from moorelm.inference.output import StopText
from moorelm.inference.scheduler import QueueFull
from moorelm.inference.sequence import Request
from moorelm.model import GPT
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT


@pytest.fixture(scope="module")
def lm(tiny_run):
    return moorelm.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def engine(lm):
    eng = Engine(lm.model, lm.tokenizer, max_batch=8, max_queue=64).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def long_lm():
    """A random model with a long context window: requests that run for hundreds of steps."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, seq_len=512,
                            vocab_size=tok.vocab_size)).eval()
    return model, tok


def ids(lm, text: str) -> tuple[int, ...]:
    return tuple(lm.tokenizer.encode(text))


def text_of(events) -> str:
    return "".join(e.text for e in events)


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def scripted_model(tokenizer: Tokenizer, chain: list[int], seq_len: int = 64) -> GPT:
    """A real GPT whose weights make it continue deterministically: after token chain[i]
    it predicts chain[i + 1]; after any other token, end of text.

    One-hot embeddings, blocks that start as the identity (zero output projections), and an
    output head that maps token i's direction to its successor's logit (sqrt(C) vs 0).
    """
    V = tokenizer.vocab_size
    C = (V + 63) // 64 * 64
    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=C, seq_len=seq_len, vocab_size=V, pos="rope",
                      norm="rmsnorm", mlp="gelu", zero_init_proj=True, tie_embeddings=False)
    model = GPT(cfg).eval()
    successor = {t: tokenizer.eot_id for t in range(V)}
    successor.update(zip(chain, chain[1:]))
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wte.weight[:, :V] = torch.eye(V)
        model.lm_head.weight.zero_()
        for t, nxt in successor.items():
            model.lm_head.weight[nxt, t] = 1.0
    return model


def byte_id(tokenizer: Tokenizer, b: int) -> int:
    return tokenizer.hf.token_to_id(f"<0x{b:02X}>")


def test_multibyte_characters_are_never_split():
    """Characters spelled by several byte tokens (an emoji: 4, é: 2) come out whole, in the
    event of their last byte, and the text ends where the model ends it."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    chain = [tok.encode("A")[0], *(byte_id(tok, b) for b in "😀é".encode()),
             tok.encode("B")[0], tok.eot_id]
    model = scripted_model(tok, chain)
    eng = Engine(model, tok, max_batch=2).start()
    try:
        for temperature in (0.0, 1.0):
            events = eng.generate(Request(((chain[0],),), SamplingParams(
                max_new_tokens=20, temperature=temperature, seed=0)))[0]
            assert [e.text for e in events] == ["", "", "", "😀", "", "é", "B", ""]
            assert events[-1].finish_reason == "stop" and events[-1].token == tok.eot_id
            stopped = eng.generate(Request(((chain[0],),), SamplingParams(max_new_tokens=20),
                                           stop=("éB",)))[0]
            assert text_of(stopped) == "😀" and stopped[-1].finish_reason == "stop"
    finally:
        eng.stop()


PROMPTS = ["ROMEO:\n", "JULIET:\nO Romeo", "It is", "Deny thy father and"]
SETTINGS = [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.9, top_k=5),
            dict(temperature=1.2, top_p=0.8), dict(temperature=1.0, frequency_penalty=1.5,
                                                   presence_penalty=0.5)]


def test_batched_equals_alone(lm, engine):
    """A seeded (or greedy) request produces the same text alone as in a full batch of
    requests with other prompts, lengths and settings (prefilled together, leaving at
    different steps, the waiting ones joining as slots free up)."""
    reqs = []
    for i in range(12):
        prompt = ids(lm, PROMPTS[i % len(PROMPTS)])
        params = SamplingParams(max_new_tokens=32 - len(prompt) - (i % 5), seed=1000 + i,
                                **SETTINGS[i % len(SETTINGS)])
        reqs.append(Request((prompt,), params, stop_at_eot=False))
    alone = [text_of(engine.generate(r)[0]) for r in reqs]
    engine.pause()  # all admitted in one step: prompts of one length share a prefill pass
    handles = [engine.submit(r) for r in reqs]
    engine.resume()
    batched = []
    for h in handles:
        batched.append("".join(e.text for events in h for e in events))
    assert batched == alone
    assert len(set(alone)) > 6  # the requests really differ


def test_engine_samples_like_generate_tokens(lm, engine):
    """The engine's sampler is generate.py's: same seed and settings, same tokens as
    generate_tokens (greedy and sampled)."""
    prompt = ids(lm, "ROMEO:\nBut")
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=7),
               dict(temperature=0.8, top_k=4, seed=3), dict(temperature=1.0, top_p=0.7, seed=5)):
        ref = [int(t[0]) for t in generate_tokens(lm.model, torch.tensor([prompt]), 20, **kw)]
        events = engine.generate(Request((prompt,), SamplingParams(max_new_tokens=20, **kw),
                                         stop_at_eot=False))[0]
        assert [e.token for e in events] == ref


def test_text_is_the_decoded_tokens(lm, engine):
    """Concatenated streamed text equals decoding all sampled tokens at once: streaming
    loses, splits or alters nothing (no stop sequence; end of text and the byte-fallback
    tokens, whose random sequences are not UTF-8, banned)."""
    prompt = ids(lm, "JULIET:\n")
    ban = {lm.tokenizer.eot_id: -100.0}
    ban.update({lm.tokenizer.hf.token_to_id(f"<0x{b:02X}>"): -100.0 for b in range(256)})
    for seed in range(4):
        events = engine.generate(Request((prompt,), SamplingParams(max_new_tokens=24, seed=seed,
                                                                   temperature=1.5),
                                         logit_bias=ban))[0]
        tokens = [e.token for e in events]
        assert lm.tokenizer.eot_id not in tokens
        assert text_of(events) == lm.tokenizer.decode(tokens)
        assert [e.finish_reason for e in events] == [None] * 23 + ["length"]


def test_n_choices_use_consecutive_seeds(lm, engine):
    """n=3 with seed s gives, as choice j, the text of a single request with seed s+j; two
    prompts give choices prompt-major (index = prompt * n + j)."""
    a, b = ids(lm, "ROMEO:"), ids(lm, "It is")
    params = SamplingParams(max_new_tokens=10, seed=40)
    out = engine.generate(Request((a, b), params, n=3, stop_at_eot=False))
    assert [e.index for e in out[4]] == [4] * 10
    for c in range(6):
        prompt = (a, b)[c // 3]
        single = SamplingParams(max_new_tokens=10, seed=40 + c)
        assert text_of(out[c]) == text_of(engine.generate(Request((prompt,), single,
                                                                  stop_at_eot=False))[0])


def test_logit_bias_and_penalties(lm, engine):
    """logit_bias +100 forces a token; a bias of +5 with frequency penalty 2 repeats the
    token while 5 - 2*count stays ahead of the others, then moves on."""
    prompt = ids(lm, "ROMEO:")
    x = lm.tokenizer.encode("x")[0]
    forced = engine.generate(Request((prompt,), SamplingParams(max_new_tokens=6, seed=1),
                                     logit_bias={x: 100.0}))[0]
    assert text_of(forced) == "xxxxxx"
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([prompt]), last_only=True)
    spread = float(logits.max() - logits.min())
    bias = spread + 4.0  # beats any other token by more than 4 at first
    tokens = [e.token for e in engine.generate(Request(
        (prompt,), SamplingParams(temperature=0, max_new_tokens=12, frequency_penalty=2.0),
        logit_bias={x: bias}))[0]]
    assert tokens[:2] == [x, x]
    assert tokens.count(x) < 12


def test_logprobs_are_the_models(lm, engine):
    """Reported log-probabilities are log_softmax of the model's logits: greedy picks the
    top alternative, alternatives come sorted, and they match a direct forward pass."""
    prompt = ids(lm, "ROMEO:\n")
    events = engine.generate(Request((prompt,), SamplingParams(temperature=0, max_new_tokens=3),
                                     logprobs=3, stop_at_eot=False))[0]
    first = events[0]
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([prompt]), last_only=True)
    lp = torch.log_softmax(logits[0, -1].float(), -1)
    assert first.token == int(lp.argmax())
    assert first.logprob == pytest.approx(float(lp.max()), abs=1e-5)
    assert first.top_logprobs[0][0] == first.token
    values = [v for _, v in first.top_logprobs]
    assert values == sorted(values, reverse=True) and len(values) == 3


def test_stop_text_holds_back_partial_matches():
    """StopText never emits any part of a stop sequence, even split across pieces, and
    emits everything else."""
    st = StopText(("END", "\n\n"))
    out = []
    for piece in ["ab", "cE", "N", "x", "\n", "y", "E", "N", "D", "zzz"]:
        text, hit = st.push(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "abcENx\ny"
    assert hit
    st = StopText(("abc",))
    assert st.push("xa") == ("x", False)
    assert st.push("b") == ("", False)
    assert st.flush() == "ab"


def test_stop_sequence_cuts_the_same_text(lm, engine):
    """With a stop sequence, the text is the no-stop text cut before the stop's first
    occurrence, and the choice finishes with 'stop'."""
    prompt = ids(lm, "ROMEO:\n")
    params = SamplingParams(max_new_tokens=25, seed=11, temperature=1.0)
    free = text_of(engine.generate(Request((prompt,), params, stop_at_eot=False))[0])
    stop = free[5:7]
    events = engine.generate(Request((prompt,), params, stop=(stop,), stop_at_eot=False))[0]
    assert text_of(events) == free[: free.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_requests_join_and_leave_a_running_batch(long_lm):
    """A request submitted while another is decoding joins the batch at once, is decoded
    in the same steps, and leaves when done while the first goes on."""
    model, tok = long_lm
    eng = Engine(model, tok, max_batch=4).start()
    try:
        bias = {tok.eot_id: -100.0}
        long_req = Request((tuple(tok.encode("ROMEO:")),), SamplingParams(max_new_tokens=400),
                           logit_bias=bias)
        short_req = Request((tuple(tok.encode("JULIET:")),), SamplingParams(max_new_tokens=5),
                            logit_bias=bias)
        h_long = eng.submit(long_req)
        it = iter(h_long)
        first = next(it)
        short = [e for events in eng.submit(short_req) for e in events]
        rest = [e for events in it for e in events]
        long_events = first + rest
        assert len(long_events) == 400 and len(short) == 5
        steps_long = {e.step for e in long_events}
        assert {e.step for e in short} <= steps_long  # decoded together with the long one
        assert max(e.step for e in short) < max(steps_long)  # and left before it finished
        assert eng.counters["errors"] == 0
    finally:
        eng.stop()


def test_cancel_frees_the_slot_at_once(long_lm):
    """Cancelling a running request removes its row at the next step (well before its
    max_tokens), and the engine goes on serving others."""
    model, tok = long_lm
    eng = Engine(model, tok, max_batch=2).start()
    try:
        req = Request((tuple(tok.encode("ROMEO:")),), SamplingParams(max_new_tokens=500),
                      logit_bias={tok.eot_id: -100.0})
        h = eng.submit(req)
        next(iter(h))
        assert eng.stats()["active"] == 1
        h.cancel()
        assert wait_until(lambda: eng.stats()["active"] == 0)
        assert eng.stats()["cancelled"] == 1
        assert eng.counters["tokens"] < 500
        again = eng.generate(Request((tuple(tok.encode("It")),), SamplingParams(max_new_tokens=3)))
        assert len(again[0]) >= 1
        assert eng.counters["errors"] == 0  # a step left with no rows is not an error
    finally:
        eng.stop()


def test_bounded_queue(long_lm):
    """With every slot busy and max_queue requests waiting, submit raises QueueFull;
    cancelled waiting requests leave the queue; once slots free up, everything queued runs."""
    model, tok = long_lm
    eng = Engine(model, tok, max_batch=1, max_queue=2).start()
    try:
        busy = eng.submit(Request((tuple(tok.encode("It")),), SamplingParams(max_new_tokens=500),
                                  logit_bias={tok.eot_id: -100.0}))
        next(iter(busy))  # it holds the only slot
        req = Request((tuple(tok.encode("It")),), SamplingParams(max_new_tokens=4))
        a, b = eng.submit(req), eng.submit(req)
        with pytest.raises(QueueFull):
            eng.submit(req)
        b.cancel()
        assert wait_until(lambda: eng.stats()["waiting"] == 1)
        c = eng.submit(req)
        busy.cancel()
        for h in (a, c):
            events = [e for batch in h for e in batch]
            assert events[-1].finish_reason in ("stop", "length")
        assert eng.stats()["rejected"] == 1
        assert wait_until(lambda: eng.stats()["active"] == 0)
    finally:
        eng.stop()


def test_one_failing_row_fails_alone(lm, monkeypatch):
    """When sampling fails for one row (here: a sampler made to refuse a token that one
    request forces with logit_bias), that request ends with an error event while the
    others in the same batch finish with the same text as alone."""
    import moorelm.inference.sampler as engine_module

    poison = lm.tokenizer.encode("x")[0]
    real = engine_module.sample_next_token

    def picky(logits, *args, **kwargs):
        if bool((logits.argmax(-1) == poison).any()):
            raise MoorelmError("refused")
        return real(logits, *args, **kwargs)

    healthy = [Request((ids(lm, p),), SamplingParams(max_new_tokens=8, seed=i, **SETTINGS[i]),
                       stop_at_eot=False) for i, p in enumerate(PROMPTS)]
    eng = Engine(lm.model, lm.tokenizer, max_batch=8).start()
    try:
        alone = [text_of(eng.generate(r)[0]) for r in healthy]
        monkeypatch.setattr(engine_module, "sample_next_token", picky)
        bad = eng.submit(Request((ids(lm, "It"),), SamplingParams(max_new_tokens=8, seed=9),
                                 logit_bias={poison: 100.0}))
        handles = [eng.submit(r) for r in healthy]
        bad_events = [e for batch in bad for e in batch]
        assert bad_events[-1].finish_reason == "error" and "refused" in bad_events[-1].error
        for h, want in zip(handles, alone):
            events = [e for batch in h for e in batch]
            assert events[-1].finish_reason == "length" and text_of(events) == want
    finally:
        eng.stop()


def test_tiny_temperature_and_top_p_are_served(lm, engine):
    """temperature and top_p of 1e-300 (NaN and an empty nucleus in float32) are served as
    greedy, in a batch beside ordinary requests, instead of failing every row."""
    prompt = ids(lm, "ROMEO:")
    greedy = text_of(engine.generate(Request((prompt,), SamplingParams(
        temperature=0, max_new_tokens=6), stop_at_eot=False))[0])
    tiny = [Request((prompt,), SamplingParams(temperature=1e-300, max_new_tokens=6, seed=1),
                    stop_at_eot=False),
            Request((prompt,), SamplingParams(top_p=1e-300, max_new_tokens=6, seed=2),
                    stop_at_eot=False),
            Request((prompt,), SamplingParams(temperature=1.0, max_new_tokens=6, seed=3),
                    stop_at_eot=False)]
    handles = [engine.submit(r) for r in tiny]
    out = [[e for batch in h for e in batch] for h in handles]
    assert [text_of(o) for o in out[:2]] == [greedy, greedy]
    assert all(o[-1].finish_reason == "length" for o in out)


def test_invalid_requests(lm, engine):
    """Requests the model cannot serve are refused with a one-line MoorelmError naming the
    problem: context window, empty prompt, unknown token ids, zero max tokens, logit_bias
    ids and values outside OpenAI's [-100, 100] (a huge one overflowed the logits)."""
    prompt = ids(lm, "ROMEO:")
    cases = [
        (Request((prompt,), SamplingParams(max_new_tokens=40)), "context window of 32"),
        (Request(((),), SamplingParams(max_new_tokens=4)), "prompt is empty"),
        (Request(((10**6,),), SamplingParams(max_new_tokens=4)), "not in the vocabulary"),
        (Request((prompt,), SamplingParams(max_new_tokens=0)), "at least 1"),
        (Request((prompt,), SamplingParams(max_new_tokens=4), logit_bias={-1: 1.0}),
         "logit_bias"),
        (Request((prompt,), SamplingParams(max_new_tokens=4), logit_bias={5: 1.8e308}),
         r"\[-100, 100\]"),
        (Request((prompt,), SamplingParams(max_new_tokens=4), logit_bias={5: float("nan")}),
         r"\[-100, 100\]"),
    ]
    for req, needle in cases:
        with pytest.raises(MoorelmError, match=needle):
            engine.submit(req)
    with pytest.raises(MoorelmError, match="max batch"):
        Engine(lm.model, lm.tokenizer, max_batch=0)
    with pytest.raises(MoorelmError, match="threads"):
        Engine(lm.model, lm.tokenizer, threads=0)


def test_engine_thread_uses_its_thread_count(lm):
    """The thread count reaches the engine's own thread (torch's setting is per thread for
    MKL), whatever the calling thread has set."""
    import threading

    seen = []
    from moorelm.inference.runner import Runner

    real = Runner.decode

    def spy(self, tokens):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(self, tokens)

    before = torch.get_num_threads()
    eng = Engine(lm.model, lm.tokenizer, threads=1)
    try:
        Runner.decode = spy
        eng.start()
        eng.generate(Request((ids(lm, "ROMEO:"),), SamplingParams(max_new_tokens=3)))
    finally:
        Runner.decode = real
        eng.stop()
    assert seen and all(s == ("moorelm-engine", 1) for s in seen)
    assert torch.get_num_threads() == before  # the caller's own setting is untouched
