"""``moorelm chat RUN``: talk with a model in the terminal, through its own chat template.

Replies stream as they are produced and end at the model's end-of-turn token. The history is
kept as long as it fits in the context window (the oldest turns are dropped, said once);
``--system`` sets a system message; ``/reset`` clears the history, ``/quit`` (or end of input)
leaves; Ctrl-C stops the reply being written and the session goes on. ``--prompt TEXT``
answers once and exits. Sampling flags are ``generate``'s. A message that cannot be answered
(a line that is not UTF-8, one too long for the window) gets one error line and the session
goes on without it; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import sys

from moorelm.cli.core import (
    add_sampling_flags,
    add_weights_flag,
    check_json_schema,
    json_schema_of,
    sampling_control,
)
from moorelm.errors import MoorelmError

HELP = "commands: /reset clears the conversation, /quit leaves (so does end of input)"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a run in the terminal (its own chat template)",
                       description="An interactive chat: each line you type is a user turn; "
                       "the reply streams and stops at the model's end-of-turn token. "
                       + HELP + "; Ctrl-C stops a reply. --prompt answers once and exits.")
    p.add_argument("run", help="run folder")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    add_sampling_flags(p)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print the reply as it is produced (default on)")
    p.add_argument("--device", default="auto")
    add_weights_flag(p)
    p.set_defaults(func=cmd_chat)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_chat(args) -> int:
    import moorelm
    from moorelm.tokenizer import check_unicode

    control = sampling_control(args)  # validated before loading
    if args.prompt is not None and not args.prompt.strip():
        raise MoorelmError("--prompt is empty; give the message to answer")
    for flag, value in (("--prompt", args.prompt), ("--system", args.system)):
        if value is not None:
            check_unicode(value, flag)
    control.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens)
    schema = json_schema_of(args)
    if schema is not None:
        control["json_schema"] = schema
    lm = moorelm.load(args.run, device=args.device, weights=args.weights,
                      batched=False)  # one sequence at a time: see moorelm.load
    check_json_schema(lm, schema)
    if control["ban"]:
        control["ban"] = lm.ban_list(control["ban"])
    session = ChatSession(lm, args.system, control, args.seed, args.stream)
    if args.prompt is not None:
        session.turn(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        _say(f"chatting with {lm.name}; {HELP}")
    # a line that is not UTF-8 reaches the session (which names it) instead of failing the
    # read; stdin is given back as it was, for an in-process caller
    stdin, before = sys.stdin, getattr(sys.stdin, "errors", None)
    if before is not None and hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")
    try:
        return _loop(session, interactive)
    finally:
        if before is not None and hasattr(stdin, "reconfigure"):
            stdin.reconfigure(errors=before)


def _loop(session: ChatSession, interactive: bool) -> int:
    """Read lines until /quit or end of input, each a turn -> exit status (2 if a turn
    failed)."""
    failed = False
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # at the prompt: a fresh prompt, the session goes on
            _say("")
            continue
        if not line:  # end of input
            if interactive:
                _say("")
            return 2 if failed else 0
        text = line.rstrip("\n")
        command = text.strip()
        if command in ("/quit", "/exit"):
            return 2 if failed else 0
        if command == "/reset":
            session.reset()
            _say("(conversation cleared)")
            continue
        if command.startswith("/") and " " not in command:
            _say(f"unknown command {command}; {HELP}")
            continue
        if not command:
            continue
        try:
            session.turn(text)
        except MoorelmError as e:  # this turn only: the conversation so far stays
            _say(f"moorelm: error: {e}")
            failed = True


class ChatSession:
    """A conversation with ``lm``: the history, and one turn at a time printed to stdout."""

    def __init__(self, lm, system: str | None, control: dict, seed: int | None, stream: bool):
        self.lm, self.system, self.control, self.seed, self.stream = lm, system, control, seed, stream
        self.turns = 0
        self.told_dropped = False
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] \
            if self.system else []

    def turn(self, text: str) -> str:
        """Answer ``text`` (printing the reply as it comes); the reply joins the history.
        MoorelmError, the history unchanged, for a message that cannot be answered."""
        from moorelm.generate import nth_seed
        from moorelm.tokenizer import check_unicode

        check_unicode(text, "the message")
        self.messages.append({"role": "user", "content": text})
        try:
            prompt, dropped = self.lm.chat_prompt(self.messages, self.control["max_new_tokens"])
        except MoorelmError:
            self.messages.pop()
            raise
        if dropped:
            self.messages = self._drop(dropped)
            if not self.told_dropped:
                _say(f"moorelm: note: the conversation no longer fits in the context window "
                     f"({self.lm.config.seq_len} tokens); its oldest turns are dropped")
                self.told_dropped = True
        seed = nth_seed(self.seed, self.turns)
        self.turns += 1
        parts: list[str] = []
        try:
            for piece in self.lm.chat_pieces(prompt, seed=seed, **self.control):
                parts.append(piece)
                if self.stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            _say("\n(reply stopped)")
        reply = "".join(parts)
        if not self.stream:
            sys.stdout.write(reply)
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def _drop(self, n: int) -> list[dict]:
        """The history without its ``n`` oldest non-system messages."""
        head = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        return self.messages[:head] + self.messages[head + n:]
