"""What a deployment may say, whatever its clients ask: ``ServePolicy``, read from
``moorelm serve --policy FILE`` (YAML or JSON).

    stop: ["\\nUSER:", "THE END"]      # every reply ends before these (on top of the client's)
    bad_words: ["forsooth"]             # never produced, across token boundaries
    max_tokens: 200                     # the most tokens one choice may generate
    over_max_tokens: clamp              # clamp (default) | reject: a larger max_tokens gets 400
    models:                             # optional: per served model, over the keys above
      demo: {max_tokens: 50}

Clients cannot lift any of it: their own stop strings and banned phrases are added to the
policy's, and a request without ``max_tokens`` gets the policy's bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from moorelm.errors import MoorelmError
from moorelm.generate import check_phrases
from moorelm.jsonfile import read_mapping

OVER_MAX = ("clamp", "reject")
MAX_POLICY_STRINGS = 256


@dataclass(frozen=True)
class ServePolicy:
    """A served model's bounds (see the module docstring); the default bounds nothing."""

    stop: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    max_tokens: int | None = None
    over_max_tokens: str = "clamp"

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise MoorelmError("policy stop must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(dict.fromkeys(stop)))
        if isinstance(self.bad_words, str):
            raise MoorelmError("policy bad_words must be a list of phrases")
        object.__setattr__(self, "bad_words", check_phrases(self.bad_words))
        for name in ("stop", "bad_words"):
            if len(getattr(self, name)) > MAX_POLICY_STRINGS:
                raise MoorelmError(f"policy {name} holds more than {MAX_POLICY_STRINGS} strings")
        m = self.max_tokens
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise MoorelmError(f"policy max_tokens must be an integer >= 1, got {m!r}")
        if self.over_max_tokens not in OVER_MAX:
            raise MoorelmError(f"policy over_max_tokens must be one of {', '.join(OVER_MAX)}, "
                               f"got {self.over_max_tokens!r}")

    def with_bans(self, phrases: Iterable[str]) -> ServePolicy:
        """This policy with more banned phrases (``serve --ban``)."""
        return replace(self, bad_words=self.bad_words + tuple(phrases))


_KEYS = {f.name for f in fields(ServePolicy)}


def _from_mapping(data: dict, where: str) -> dict:
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise MoorelmError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are "
                           f"{', '.join(sorted(_KEYS))} and models")
    out = dict(data)
    for key in ("stop", "bad_words"):
        if key in out and isinstance(out[key], list):
            out[key] = tuple(out[key])
        elif key in out and out[key] is None:
            out[key] = ()
    return out


def load_policy(path: str | Path, model_name: str | None = None) -> ServePolicy:
    """The policy in a YAML (.yaml, .yml) or JSON file, for ``model_name`` when the file has
    a ``models`` section (its entry's keys override the top-level ones)."""
    path = Path(path)
    data = read_mapping(path, "serving policy")
    models = data.pop("models", None) or {}
    if not isinstance(models, dict):
        raise MoorelmError(f"{path}: models must map model names to policies")
    merged = _from_mapping(data, str(path))
    if models and not merged and model_name not in models:
        raise MoorelmError(f"{path} has no policy for model {model_name!r} (it has: "
                           f"{', '.join(map(str, models))}); add one or a top-level policy")
    if model_name is not None and model_name in models:
        entry = models[model_name]
        if not isinstance(entry, dict):
            raise MoorelmError(f"{path}: models.{model_name} must be a mapping")
        merged.update(_from_mapping(entry, f"{path}: models.{model_name}"))
    try:
        return ServePolicy(**merged)
    except TypeError as e:
        raise MoorelmError(f"{path}: {e}") from None
    except MoorelmError as e:
        raise MoorelmError(f"{path}: {e}") from None
