"""The inference engine's parts on their own: the scheduler's admission, prefill plan and
compaction, the one request check, choice output, and the package's import boundaries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from moorelm.generate import SamplingParams
from moorelm.inference.limits import ModelLimits, RequestError
from moorelm.inference.output import ChoiceText
from moorelm.inference.scheduler import PREFILL_TOKENS, QueueFull, Scheduler
from moorelm.inference.sequence import Request, RequestHandle
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT

PKG = Path(__file__).resolve().parents[1] / "moorelm"


def handle(prompts, n=1, max_new=4) -> RequestHandle:
    return RequestHandle(Request(tuple(prompts), SamplingParams(max_new_tokens=max_new), n),
                         lambda: None)


class Seat:
    """A stand-in for a Sequence: the scheduler only reads ``handle``."""

    def __init__(self, h: RequestHandle, index: int):
        self.handle, self.index = h, index


def test_admission_fills_free_slots_in_order_and_plans_prefills():
    """Waiting choices take free slots first come first served; a prompt with n choices is
    prefilled once (its other choices copy it); equal lengths share a pass; a request
    larger than the free slots waits with its remaining choices."""
    s = Scheduler(max_batch=4, max_queue=8)
    a = handle([(1, 2, 3)], n=2)
    b = handle([(4, 5, 6), (7, 8)])
    c = handle([(9,)])
    for h in (a, b, c):
        s.add(h)
    passes = s.admit()
    plans = [[(p.handle, p.prompt, p.choices) for p in chunk] for chunk in passes]
    assert plans == [[(a, (1, 2, 3), [0, 1]), (b, (4, 5, 6), [0])], [(b, (7, 8), [1])]]
    assert list(s.waiting) == [c] and not b.pending and not a.pending


def test_prefill_passes_are_bounded():
    """No prefill pass holds more than PREFILL_TOKENS prompt tokens (but at least one prompt)."""
    T = PREFILL_TOKENS // 3
    s = Scheduler(max_batch=8, max_queue=8)
    for _ in range(7):
        s.add(handle([tuple(range(T))]))
    sizes = [len(chunk) for chunk in s.admit()]
    assert sizes == [3, 3, 1]


def test_leaving_compacts_from_the_back():
    """Finished sequences leave and the last active ones move into their slots, so the
    active ones always fill the front; the moves returned mirror that for the cache."""
    s = Scheduler(max_batch=6, max_queue=0)
    h = handle([(1,)], n=6)
    seats = [Seat(h, i) for i in range(6)]
    for seat in seats:
        s.join(seat)
    moves = s.leave([1, 3])
    assert moves == [(3, 5), (1, 4)]
    assert [seat.index for seat in s.active] == [0, 4, 2, 5]
    assert s.leave([3]) == [(3, 3)]  # the last one: nothing moves, its slot is freed


def test_queue_bound_and_cancelled_waiting():
    """Beyond max_queue requests waiting for busy slots, add raises QueueFull; a cancelled
    request that never got a slot leaves the queue and counts once."""
    s = Scheduler(max_batch=1, max_queue=1)
    s.join(Seat(handle([(1,)]), 0))
    first = handle([(1,)])
    s.add(first)
    with pytest.raises(QueueFull):
        s.add(handle([(1,)]))
    first.cancelled = True
    assert s.cancelled() == ([], 1)
    assert not s.waiting


def test_one_request_check():
    """ModelLimits.check is the one check of a request against the model; each refusal
    names its field (the server's 400 uses it as param)."""
    limits = ModelLimits(seq_len=16, token_vocab=50)

    def req(prompts=((1, 2),), max_new=4, **kw):
        return Request(tuple(prompts), SamplingParams(max_new_tokens=max_new), **kw)

    cases = [(req(()), "prompt"), (req(((),)), "prompt"), (req(((1, 50),)), "prompt"),
             (req(max_new=15), "max_tokens"), (req(max_new=0), "max_tokens"),
             (req(n=65), "n"), (req(stop=("",)), "stop"),
             (req(logit_bias={50: 1.0}), "logit_bias"), (req(logit_bias={3: 100.5}), "logit_bias"),
             (req(logprobs=51), "logprobs")]
    for request, param in cases:
        with pytest.raises(RequestError) as e:
            limits.check(request)
        assert e.value.param == param, (request, str(e.value))
    assert pytest.raises(RequestError, limits.check, req(max_new=15)).value.code == \
        "context_length_exceeded"
    limits.check(req(max_new=14, logit_bias={3: -100.0}, stop=("x",), logprobs=50))


def test_choice_text_finishes():
    """ChoiceText ends a choice at end of text, at a stop string (cut before it) or at max
    tokens, flushing what it held back."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    ids = tok.encode("abcab")
    out = ChoiceText(tok, ("ca",), True, 10)
    got = [out.push(t) for t in ids]
    assert "".join(t for t, _ in got[:4]) == "ab" and got[3][1] == "stop"
    out = ChoiceText(tok, ("zz",), True, 3)
    got = [out.push(t) for t in tok.encode("abz")]
    assert "".join(t for t, _ in got) == "abz" and got[-1][1] == "length"
    out = ChoiceText(tok, (), True, 10)
    assert out.push(tok.encode("a")[0]) == ("a", None)
    assert out.push(tok.eot_id) == ("", "stop")


def _imports(path: Path) -> set[str]:
    """Modules a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_import_boundaries():
    """The inference package knows nothing of HTTP or the server; the server's modules do
    not import their own package (no serve <-> serve.api cycle); fine-tuning and the
    benchmarks reach the engine through moorelm.inference, never the server."""
    for path in (PKG / "inference").glob("*.py"):
        for mod in _imports(path):
            assert not mod.startswith(("moorelm.serve", "fastapi", "starlette", "uvicorn")), \
                f"{path.name} imports {mod}"
    for path in (PKG / "serve").glob("*.py"):
        if path.name != "__init__.py":
            assert "moorelm.serve" not in _imports(path), f"serve/{path.name} imports its package"
    bench = PKG.parent / "bench"
    for path in [*(PKG / "finetune").rglob("*.py"), bench / "generate.py",
                 bench / "serve_load.py"]:
        assert not any(m.startswith("moorelm.serve") for m in _imports(path)), path
    assert not (PKG / "serve" / "engine.py").exists()


def test_no_private_reads_across_objects():
    """The engine's parts talk through public names: no ``other._name`` outside ``self``."""
    for path in (PKG / "inference").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                assert isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"), \
                    f"{path.name}:{node.lineno} reads .{node.attr}"
