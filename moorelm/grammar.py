"""Decoding constrained by a grammar: output that always parses as JSON and fits a schema.

A JSON schema (or "any JSON object") is compiled by xgrammar (docs/structured-output.md says
why that library) over a run's own token vocabulary, the bytes each token id stands for
(``Tokenizer.piece_bytes``), so char-level, byte-level BPE and imported vocabularies all work,
a token that is only part of a UTF-8 character included.

- ``check_schema``: a schema as a client sends it, checked: malformed ones (jsonschema's
  meta-schema), keywords the grammar would silently not enforce, required keys it would not
  write and patterns too large to compile quickly are a ``GrammarError`` naming the problem;
- ``Grammars``: one vocabulary's compiler (``grammars_for(tokenizer, vocab_size, stop_ids)``
  keeps one per tokenizer) and its cache of compiled schemas; ``compile(schema)`` ->
  ``Grammar``, ``compile(None)`` -> any JSON object;
- ``Grammar.state()`` -> ``GrammarState``, one sequence's position in it: ``apply(logits)``
  sets every token the grammar does not allow next to -inf, ``push(token)`` advances. Once
  the JSON is complete the only tokens allowed are the stop ids, so decoding ends there;
- ``apply_grammars(logits, rows, states)``: the masks of many rows of one batch, filled
  together and applied in place (the serving engine's sampler).

Where xgrammar alone would let through text that is not JSON or not UTF-8 (raw control
characters in strings, UTF-16 surrogates spelled in UTF-8), the vocabulary it is given and
``GrammarState`` close the gap. Whitespace between JSON tokens is not free: the grammar spells separators one way (``", "``
and ``": "``), so a model cannot pad forever and a blank line (a chat template's stop text)
never occurs inside the output.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from moorelm.errors import MoorelmError
from moorelm.tokenizer import Tokenizer

ANY_OBJECT = {"type": "object"}  # what "any JSON object" (json_object mode) compiles
COMPILED_CACHE = 64  # compiled schemas kept per vocabulary
MAX_SCHEMA_BYTES = 256 * 1024  # a schema's JSON text
MAX_SCHEMA_DEPTH = 64  # nesting of a schema's JSON
# a pattern's size with its bounded repeats written out ("(a|b){1,5000}": 15,000), summed
# over the schema: compiling grows faster than linearly in it (4,096: about a second)
MAX_PATTERN_SIZE = 4096

# keywords xgrammar reads past without enforcing: refused, so "validates" stays true
UNENFORCED = ("not", "if", "then", "else", "uniqueItems", "contains", "minContains",
              "maxContains", "dependentRequired", "dependentSchemas", "dependencies",
              "propertyNames", "multipleOf", "unevaluatedItems", "oneOf")
# keywords whose value is a schema, a list of schemas, or a map name -> schema
_SUB = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties")
_SUB_LIST = ("anyOf", "allOf", "prefixItems")
_SUB_MAP = ("properties", "patternProperties", "$defs", "definitions")
_LOG_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")  # xgrammar's "[18:11:05] file.cc:94: "


class GrammarError(MoorelmError):
    """A schema that is malformed or that the grammar library cannot compile (one line)."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise MoorelmError("structured output needs xgrammar, which is not installed: "
                           "pip install xgrammar") from None
    return xgrammar


# ----------------------------------------------------------------------------- schemas


def check_schema(schema: object, what: str = "json schema") -> dict | bool:
    """``schema`` (a dict, or True / False as JSON Schema allows) if it is a well-formed JSON
    Schema whose every keyword the grammar enforces; ``GrammarError`` naming the problem
    otherwise."""
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"{what} must be a JSON object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"{what} is not JSON: {e}") from None
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"{what} is {len(text):,} bytes; at most {MAX_SCHEMA_BYTES:,}")
    _check_depth(schema, what)
    try:
        import jsonschema
    except ImportError:  # the checks below still catch what the grammar cannot enforce
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator) \
                .check_schema(schema)
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path)
            raise GrammarError(f"{what} is malformed" + (f" at {where}" if where else "")
                               + f": {_first_line(e.message)}") from None
    _check_keywords(schema, what, "")
    size = sum(pattern_size(p) for p in _patterns(schema))
    if size > MAX_PATTERN_SIZE:
        raise GrammarError(f"{what}: its patterns are too large to compile ({size:,} regex "
                           f"atoms with their repeats written out, at most "
                           f"{MAX_PATTERN_SIZE:,}); use smaller repeat counts")
    return schema


def _patterns(value: object):
    """Every string under a "pattern" key (and patternProperties' names) in a schema."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if isinstance(v.get("pattern"), str):
                yield v["pattern"]
            if isinstance(v.get("patternProperties"), dict):
                yield from (k for k in v["patternProperties"] if isinstance(k, str))
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def pattern_size(pattern: str) -> int:
    """An upper bound of a regular expression's size once bounded repeats (``{n}``,
    ``{n,m}``) are written out, nested ones multiplying: what a grammar of it holds."""
    levels = [[0, 0]]  # per open group: [size so far, size of its last atom]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "{" and (m := _REPEAT.match(pattern, i)):
            count = int(m.group(2) or m.group(1))  # {n}, {n,}: n; {n,m}: m
            top = levels[-1]
            top[0] += top[1] * (max(count, 1) - 1)
            top[1] *= max(count, 1)
            i = m.end()
            continue
        if c == "(":
            levels.append([0, 0])
            i += 1
            continue
        if c == ")" and len(levels) > 1:
            atom = max(levels.pop()[0], 1)
            i += 1
        elif c == "\\":
            atom, i = 1, i + 2
        elif c == "[":
            j = i + 1
            j += pattern[j : j + 1] == "^"
            j += pattern[j : j + 1] == "]"
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            atom, i = 1, j + 1
        else:
            atom, i = 1, i + 1
        levels[-1][0] += atom
        levels[-1][1] = atom
    return sum(total for total, _ in levels)


def _check_depth(value: object, what: str) -> None:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"{what} is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def _check_keywords(schema: object, what: str, path: str) -> None:
    """Refuse, with where they are, the keywords the grammar would ignore, and references
    that point outside the schema."""
    if not isinstance(schema, dict):
        return
    for key in UNENFORCED:
        if key in schema:
            raise GrammarError(f"{what}: the keyword {key!r} (at {path or '/'}) is not "
                               "supported by structured output; remove it")
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        raise GrammarError(f"{what}: 'allOf' with more than one schema (at {path or '/'}) is "
                           "not supported by structured output; merge them into one")
    required, props = schema.get("required"), schema.get("properties") or {}
    if isinstance(required, list) and "patternProperties" not in schema:
        missing = [k for k in required if k not in props]
        if missing:  # the grammar writes only the properties it is told about
            raise GrammarError(f"{what}: the required key {missing[0]!r} (at {path or '/'}) "
                               "is not among the properties; describe it in 'properties'")
    ref = schema.get("$ref")
    if ref is not None and not (ref == "#" or str(ref).startswith("#/")):
        raise GrammarError(f"{what}: $ref {ref!r} (at {path or '/'}) points outside the "
                           "schema; only local references ('#/...') are supported")
    for key in _SUB:
        if isinstance(schema.get(key), dict):
            _check_keywords(schema[key], what, f"{path}/{key}")
    for key in _SUB_LIST:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                _check_keywords(sub, what, f"{path}/{key}/{i}")
    for key in _SUB_MAP:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                _check_keywords(sub, what, f"{path}/{key}/{name}")


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def load_schema_file(path: str | Path) -> dict | bool:
    """A JSON schema read from a file (``--json-schema FILE``), checked; one line for a
    missing file, one that is not JSON, or a schema that is malformed."""
    from moorelm.jsonfile import read_json

    return check_schema(read_json(Path(path), max_bytes=MAX_SCHEMA_BYTES),
                        f"JSON schema {path}")


# ----------------------------------------------------------------------------- compiling


class Grammars:
    """The grammar compiler of one vocabulary: ``vocab_size`` token ids (the model's logits'
    width; ids the tokenizer lacks are never allowed), ``stop_ids`` the tokens that end the
    output once the JSON is complete. Thread-safe; compiled schemas are cached."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None,
                 stop_ids: Sequence[int] = ()):
        xgr = _xgrammar()
        V = vocab_size or tokenizer.vocab_size
        specials = set(tokenizer.hf.get_added_tokens_decoder())
        n = min(V, tokenizer.vocab_size)
        # special tokens stand for no text: the grammar never allows them (stop ids aside);
        # nor tokens holding a control character, which JSON allows neither in a string (only
        # escaped) nor, with the fixed separators, between tokens (xgrammar would let raw
        # ones into strings)
        vocab = [b"" if t in specials else _json_safe(tokenizer.piece_bytes(t))
                 for t in range(n)]
        vocab += [b""] * (V - n)
        self.pieces = vocab
        # xgrammar lets a string hold UTF-16 surrogates spelled in UTF-8 (0xED 0xA0-0xBF ...),
        # which is not UTF-8: after a lone 0xED byte these tokens are refused (GrammarState)
        words = torch.zeros((V + 31) // 32, dtype=torch.int64)
        for t, piece in enumerate(vocab):
            if piece and 0xA0 <= piece[0] <= 0xBF:
                words[t // 32] |= 1 << (t % 32)
        self.after_ed = ~_int32(words)  # (ceil(V / 32),) int32: AND-ed into a row's bitmask
        self.vocab_size = V
        self.stop_ids = sorted({int(t) for t in stop_ids} or {tokenizer.eot_id})
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=V,
                                      stop_token_ids=self.stop_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, schema: dict | bool | None = None, what: str = "json schema") -> Grammar:
        """The grammar of ``schema`` (None: any JSON object), checked first (``check_schema``)
        and cached; ``GrammarError`` naming the problem when the library cannot compile it."""
        if schema is None:
            key, strict = json.dumps(ANY_OBJECT), False
        else:
            # properties keep their order: the grammar writes them in the schema's order
            key, strict = json.dumps(check_schema(schema, what)), True
        with self._lock:
            grammar = self._cache.pop(key, None)
        if grammar is None:
            try:
                compiled = self.compiler.compile_json_schema(key, any_whitespace=False,
                                                             strict_mode=strict)
            except Exception as e:  # xgrammar raises RuntimeError with its log prefix
                message = _LOG_PREFIX.sub("", _first_line(str(e)))
                raise GrammarError(f"{what} cannot be compiled into a grammar: "
                                   f"{message}") from None
            grammar = Grammar(compiled, self)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > COMPILED_CACHE:
                self._cache.popitem(last=False)
        return grammar


def _json_safe(piece: bytes) -> bytes:
    """A token's bytes, or b"" (never allowed) when they hold a control character or a
    surrogate spelled in UTF-8."""
    return b"" if any(b < 0x20 for b in piece) or _SURROGATE.search(piece) else piece


_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")


def _int32(words: torch.Tensor) -> torch.Tensor:
    """32-bit words held in int64 -> the same bits as int32 (xgrammar's bitmask type)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


_GRAMMARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> {key: Grammars}
_GRAMMARS_LOCK = threading.Lock()


def grammars_for(tokenizer: Tokenizer, vocab_size: int | None = None,
                 stop_ids: Sequence[int] = ()) -> Grammars:
    """The ``Grammars`` of a tokenizer, vocabulary width and stop ids, built once."""
    key = (vocab_size or tokenizer.vocab_size, tuple(sorted(set(stop_ids))))
    with _GRAMMARS_LOCK:
        per = _GRAMMARS.setdefault(tokenizer, {})
        grammars = per.get(key)
    if grammars is None:
        grammars = Grammars(tokenizer, vocab_size, stop_ids)
        with _GRAMMARS_LOCK:
            grammars = per.setdefault(key, grammars)
    return grammars


class Grammar:
    """A compiled grammar (shared by every sequence that uses it; immutable)."""

    def __init__(self, compiled, grammars: Grammars):
        self.compiled = compiled
        self.grammars = grammars

    def state(self) -> GrammarState:
        """A fresh per-sequence matcher, at the start of the output."""
        return GrammarState(self)


class GrammarState:
    """One sequence's position in a grammar: which tokens may come next, and advancing."""

    def __init__(self, grammar: Grammar):
        xgr = _xgrammar()
        self.grammar = grammar
        self.matcher = xgr.GrammarMatcher(grammar.compiled,
                                          override_stop_tokens=grammar.grammars.stop_ids)
        self.after_ed = False  # the output ends with a lone 0xED byte (see Grammars)

    @property
    def done(self) -> bool:
        """Whether a stop token has been accepted (the output is complete)."""
        return self.matcher.is_terminated()

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole value of the grammar."""
        return self.matcher.is_completed()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (1, V) or (V,) with every token the grammar refuses next at -inf (a copy)."""
        flat = logits.reshape(1, -1).clone()
        apply_grammars(flat, [0], [self])
        return flat.reshape(logits.shape)

    def push(self, token: int) -> bool:
        """Advance by a sampled token; False when the grammar refuses it (the state is
        then unchanged)."""
        if self.matcher.is_terminated() or not self.matcher.accept_token(int(token)):
            return False
        piece = self.grammar.grammars.pieces[int(token)]
        if piece:
            self.after_ed = piece.endswith(b"\xed")
        return True


def apply_grammars(logits: torch.Tensor, rows: Sequence[int],
                   states: Sequence[GrammarState]) -> None:
    """Set, in place, the tokens each ``states[i]`` refuses to -inf in row ``rows[i]`` of
    logits (B, V); the other rows are left as they are."""
    if not rows:
        return
    xgr = _xgrammar()
    V = logits.shape[-1]
    mask = xgr.allocate_token_bitmask(logits.shape[0], V)  # (B, ceil(V / 32)) int32, on CPU
    for row, st in zip(rows, states):
        st.matcher.fill_next_token_bitmask(mask, row)
        if st.after_ed:
            mask[row] &= st.grammar.grammars.after_ed
    if logits.device.type == "cpu":
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=V, indices=list(rows))
    else:  # plain torch on accelerators: no kernel to build or load at run time
        apply_bitmask(logits, mask, list(rows))


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> None:
    """Set logits (B, V) to -inf, in place, where bit ``t % 32`` of word ``t // 32`` of
    ``mask[row]`` (B, ceil(V / 32)) int32 is 0, for each row in ``rows``."""
    V = logits.shape[-1]
    idx = torch.tensor(rows, device=logits.device)
    words = mask[rows].to(logits.device)  # (k, W)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().reshape(len(rows), -1)[:, :V]  # (k, V)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
