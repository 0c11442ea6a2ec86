"""`lutengine chat`: the terminal conversation loop.

Ctrl-C during a reply stops that reply and keeps the session; Ctrl-C at the
prompt only reminds how to leave (as Ollama does); Ctrl-D or /exit leaves.
"""
from __future__ import annotations

import sys

from .generate import ContextError, Stats
from .sampling import SamplingParams

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops a reply"


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_chat(model, args) -> int:
    from .cli import _sampling

    params = SamplingParams(**_sampling(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    conv = model.conversation(system)
    interactive = sys.stdin.isatty()
    _note(f"lutengine chat: {model.info.get('name')} ({model.info.get('quantization')}); {HELP}")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            _note("(use /exit or Ctrl-D to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            conv.messages = list(system)
            model.reset()
            _note("(conversation reset)")
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            _note(HELP)
            continue
        stats = Stats()
        try:
            for piece in conv.reply(line, params, args.max_tokens, stats):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ContextError as e:
            _note(f"lutengine: {e}")
            continue
        print(flush=True)
        if conv.dropped:
            _note(f"(dropped the {conv.dropped} oldest message(s) to fit the context of {model.max_context} tokens)")
        _note(f"[{stats.line()}]")
