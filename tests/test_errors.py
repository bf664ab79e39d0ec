"""errors.first_line: what an error line quotes from a library's exception."""

from pathlib import Path

from moorelm.codecs import _damaged
from moorelm.errors import MoorelmError, first_line


def test_first_line_quotes_the_first_non_blank_line_or_the_type():
    assert first_line(ValueError("bad header\n  at offset 8")) == "bad header"
    assert first_line(ValueError("\n\n  second\n")) == "second"
    assert first_line(KeyError()) == "KeyError"  # no message: str(e) is ""
    assert first_line(RuntimeError("x" * 500), 120) == "x" * 120
    assert first_line("") == "" and first_line("a\nb") == "a"


def test_an_exception_without_a_message_still_gives_one_line():
    """Before first_line, ``str(e).splitlines()[0]`` raised IndexError on a bare KeyError."""
    err = _damaged(Path("ckpt/model.safetensors"), KeyError())
    assert isinstance(err, MoorelmError)
    assert str(err) == ("ckpt/model.safetensors is truncated or corrupt (KeyError); use an "
                        "earlier checkpoint or retrain")
