"""The `lutengine` command line (also `python -m engine`).

Heavy imports happen inside the commands, so `--help` and `chat` start fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from models import catalog

from . import memory


class UsageError(ValueError):
    """Bad command-line input that argparse cannot see (a prompt file that is not UTF-8, ...)."""


def _threads_default() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def _read_prompt(args) -> str:
    from .tokenizer import read_text_file

    if args.file:
        return read_text_file(args.file)
    if args.prompt is None:
        raise UsageError("give a prompt with -p TEXT or --file FILE")
    return args.prompt


def _sampling(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)


def _load(args, dense: bool = False):
    from .load import load

    ctx = getattr(args, "ctx_size", None)
    est = memory.check(args.model, ctx, args.kv_type, dense)  # before any weight is read
    model = load(args.model, dense=dense, threads=args.threads, max_context=ctx, kv_type=args.kv_type,
                 progress=True, opened=est and est.qfile)
    if getattr(args, "verbose", False):
        print(model.transformer.kv.describe(), file=sys.stderr)
    return model


def cmd_pull(args) -> int:
    path = catalog.pull(args.name, progress=not args.quiet)
    size = path.stat().st_size
    print(f"{args.name}: {path} ({size:,} bytes, {size / 2**20:.1f} MiB)")
    return 0


def cmd_tokenize(args) -> int:
    from .load import load_tokenizer

    tok = load_tokenizer(args.model)
    ids = tok.encode(_read_prompt(args), special=args.special)
    if args.json:
        print(json.dumps(ids))
    else:
        for i in ids:
            print(f"{i:6d} -> {tok.token_bytes(i).decode('utf-8', 'backslashreplace')!r}")
    return 0


def cmd_info(args) -> int:
    from .info import describe

    info = describe(args.model, args.ctx_size, args.kv_type)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:22} {v}")
    return 0


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    model = _load(args, args.dense)
    for piece in model.stream(prompt, args.max_tokens, args.stop, args.ignore_eos, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(model.last_stats.line(), file=sys.stderr)
    return 0


def cmd_ppl(args) -> int:
    from .perplexity import perplexity
    from .tokenizer import read_text_file

    text = read_text_file(args.text)
    model = _load(args, args.dense)
    result = perplexity(model.transformer, model.tokenizer.encode(text, add_bos=False), args.ctx, args.windows)
    if args.json:
        print(json.dumps({"model": args.model or catalog.DEFAULT, "text": args.text, "ppl": round(result.ppl, 3),
                          "n_scored": result.n_scored, "ctx": args.ctx, "windows": args.windows,
                          "dense": args.dense, "kv_type": args.kv_type}))
    else:
        print(result.line())
    return 0


def cmd_quantize(args) -> int:
    from .quantize_cmd import run

    return run(args)


def cmd_chat(args) -> int:
    from .repl import run_chat

    return run_chat(_load(args, args.dense), args)


def cmd_bench(args) -> int:
    from .bench import command

    return command(args)


def cmd_serve(args) -> int:
    from .serve import run

    return run(args)


def _model_args(p, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                       help=f"catalog name, GGUF file, HF folder or lutengine file (default: {catalog.DEFAULT})")
    else:
        p.add_argument("-m", "--model", default=None,
                       help=f"catalog name, GGUF file, HF folder or lutengine file (default: {catalog.DEFAULT})")


def _run_args(p) -> None:
    p.add_argument("-t", "--threads", type=int, default=_threads_default(), help="kernel threads (default: all)")
    p.add_argument("--dense", action="store_true", help="run the float32 reference path instead of the quantized one")
    _kv_args(p)


def _kv_args(p) -> None:
    p.add_argument("--kv-type", choices=memory.KV_TYPES, default=memory.DEFAULT_KV_TYPE,
                   help=f"KV cache element type; q8: int8 rows with a scale each (default: {memory.DEFAULT_KV_TYPE})")


def _sampling_args(p, max_tokens: int) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens, help=f"(default: {max_tokens})")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (default: 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off (default: 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off (default: 1.0)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="(default: 64)")
    p.add_argument("-s", "--seed", type=int, default=None, help="same seed, same text (default: random)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (default: the model's, at most 4096)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lutengine", description="CPU inference for 1-4 bit LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    known = "\n".join(f"  {m.name:30} {m.description}" for m in catalog.CATALOG.values())
    p = sub.add_parser("pull", help="download a catalog model into the cache and verify it",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=f"Catalog models:\n{known}")
    p.add_argument("name", nargs="?", default=catalog.DEFAULT, metavar="NAME",
                   help=f"catalog name (default: {catalog.DEFAULT})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("tokenize", help="print the token ids of a text")
    _model_args(p)
    p.add_argument("-p", "--prompt", help="text to tokenize")
    p.add_argument("-f", "--file", help="UTF-8 file to tokenize")
    p.add_argument("--special", action="store_true", help="parse special tokens such as <|im_start|> in the text")
    p.add_argument("--json", action="store_true", help="print the ids as a JSON list")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("info", help="architecture, parameters, format and honest bits per weight of a model")
    _model_args(p, positional=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context of the KV cache size (default: the model's, at most 4096)")
    _kv_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _model_args(p)
    p.add_argument("-p", "--prompt", help="prompt text")
    p.add_argument("-f", "--file", help="UTF-8 file holding the prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens")
    p.add_argument("-v", "--verbose", action="store_true", help="print the KV cache's type and size")
    _run_args(p)
    _sampling_args(p, 128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk with a model in the terminal (/reset, /exit; Ctrl-C stops a reply)")
    _model_args(p)
    p.add_argument("--system", help="system message")
    _run_args(p)
    _sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("ppl", help="perplexity of a text, per the measurement protocol")
    _model_args(p, positional=True)
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="window length (default: 512)")
    p.add_argument("--windows", type=int, default=16, help="number of windows (default: 16)")
    p.add_argument("--json", action="store_true")
    _run_args(p)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, concurrent requests decoded together "
                       "(needs lutengine[serve])")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8080, help="(default: 8080; 0: a free port, printed)")
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together, a KV cache each (default: 4)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for a slot before 429 (default: 16)")
    p.add_argument("--ctx", type=int, default=None, help="context per slot (default: the model's, at most 4096)")
    p.add_argument("--kv-type", choices=memory.KV_TYPES, default=memory.DEFAULT_KV_TYPE,
                   help=f"KV cache element type of every slot (default: {memory.DEFAULT_KV_TYPE})")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every request but /health")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")
    p.add_argument("-t", "--threads", type=int, default=_threads_default(), help="kernel threads (default: all)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="tokens per second of prompts (ppN) and generation (tgN), like llama-bench",
                       description="Tokens per second: ppN = one forward over N prompt tokens, tgN = N greedy "
                       "decode steps. Tables go to stdout, progress to stderr.")
    p.add_argument("-m", "--model", action="append", default=None,
                   help=f"catalog name, GGUF file, HF folder or lutengine file; repeat for several "
                   f"(default: {catalog.DEFAULT})")
    p.add_argument("-p", "--n-prompt", dest="prompts", default="512", metavar="N[,N...]",
                   help="prompt sizes, 0 = none (default: 512)")
    p.add_argument("-n", "--n-gen", dest="gens", default="128", metavar="N[,N...]",
                   help="generated tokens, 0 = none (default: 128)")
    p.add_argument("-t", "--threads", default=str(_threads_default()), metavar="T[,T...]",
                   help=f"kernel threads (default: {_threads_default()})")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed runs per test (default: 5)")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="take the tokens from the start of this text (default: seeded random ids)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids (default: 0)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--md", action="store_true", help="print a markdown table (the default)")
    p.add_argument("--vs-llama-cpp", nargs="+", metavar="GGUF",
                   help="also run llama.cpp (llama-cpp-python) on these GGUF files, alternating run by run")
    p.add_argument("--llama-python", default=os.environ.get("LUTENGINE_LLAMA_PYTHON"), metavar="PATH",
                   help="python that has llama-cpp-python, if not this one (default: $LUTENGINE_LLAMA_PYTHON)")
    p.set_defaults(func=cmd_bench)

    from .quantize_cmd import add_arguments

    p = sub.add_parser("quantize", help="quantize a model to a lutengine file")
    add_arguments(p)
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.config import ModelError

    from .chat import TemplateError
    from .generate import ContextError

    try:
        return args.func(args)
    except (catalog.CatalogError, ModelError, ContextError, TemplateError, UsageError, ValueError, OSError) as e:
        if os.environ.get("LUTENGINE_DEBUG"):
            raise
        print(f"lutengine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlutengine: interrupted", file=sys.stderr)
        return 130
