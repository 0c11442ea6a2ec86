"""Chat: render the model's own template (sandboxed jinja2, bounded in time and size), fit the history
to the context, run a turn."""
from __future__ import annotations

import inspect
import re
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from functools import update_wrapper
from typing import Iterator

from .generate import ContextError, Session, Stats
from .sampling import SamplingParams

# Used only when a model ships no template; ChatML is what both catalog models use.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# A template is code from a model file. jinja2's sandbox refuses private attributes and mutation but
# not time or memory: nested loops, and single operations that build a huge value ('x' * 10**10,
# str.replace, join, widths in format specs, a list of a million references printed). So every
# operation that can build more than its inputs measures what it would build first, everything
# built in one render counts towards a total, the output is a stream cut at a limit, and a render
# has a wall-clock deadline.
MAX_OUTPUT = 2 << 20  # characters of a prompt beyond twice the messages' own: more than any context holds
MAX_BUILT = 8  # a render may build this many times its output limit, all values together
MAX_SECONDS = 4.0  # wall clock of one render (or compile); real templates take milliseconds
MAX_SOURCE = 64 << 10  # characters of template source: real ones are under 20 KB; 256 KB take 3 s to compile
MAX_COUNT = 100_000  # widths, batch and slice counts: jinja's own bound on range()
MAX_INDENT = 64  # tojson(indent=...)
MAX_INT_BITS = 1 << 14
MAX_REGEX_INPUT = 1 << 14  # striptags, urlize, wordwrap: their regular expressions backtrack quadratically
# Filters that walk a container without writing it out: measuring the container first would only cost time.
WALKING_FILTERS = frozenset({"attr", "batch", "count", "d", "default", "dictsort", "first", "groupby", "items",
                             "last", "length", "list", "map", "max", "min", "random", "reject", "rejectattr",
                             "reverse", "select", "selectattr", "slice", "sort", "sum", "unique"})

# Filters that may build more than they are given: _check_filter predicts them.
PREDICTED_FILTERS = frozenset({"batch", "center", "format", "indent", "join", "replace", "slice", "striptags", "sum",
                               "tojson", "urlize", "wordwrap"})


class TemplateError(ValueError):
    """The chat template failed to render."""


class _Refused(Exception):
    """An operation of the template was over a limit (an Exception: jinja defers it from compile time to the
    render, where it happens only if the template gets there)."""


class _OutOfTime(BaseException):
    """Raised by the trace function; a BaseException so that no `except Exception` in jinja (its
    `is sequence` test has one) can swallow it. Raising also removes the trace function, so a swallowed
    deadline would never come back."""


class _Budget:
    """The limits of one render, per thread: a ChatTemplate may render in several threads at once."""

    def __init__(self, chars: int):
        self.chars = chars  # largest value, and the output
        self.built = MAX_BUILT * chars  # left to build
        self.deadline = time.monotonic() + MAX_SECONDS


_state = threading.local()


def _budget() -> _Budget:
    return _state.budget


def _fits(n: int, what: str = "a value") -> None:
    b = _budget()
    if n > b.chars:
        raise _Refused(f"{what} of {n:,} characters or items is over the limit of {b.chars:,}")
    if n > b.built:
        raise _Refused(f"the template built more than {MAX_BUILT * b.chars:,} characters or items in all")


def _extent(v, memo: dict | None = None) -> int:
    """Characters str(v) may write. A container counts an item each time it holds it (printing repeats a
    shared item), measured once per object (memo), so a deep sharing costs linear time to measure."""
    if isinstance(v, (str, bytes)):
        return len(v)
    if isinstance(v, int):
        return v.bit_length() * 3 // 10 + 2
    if not isinstance(v, (list, tuple, dict, set, frozenset, _Namespace)):
        return 16
    memo = {} if memo is None else memo
    key = id(v)
    if key in memo:
        return memo[key]
    memo[key] = 8  # a cycle prints as '...'
    if isinstance(v, _Namespace):
        v = object.__getattribute__(v, "_Namespace__attrs")
    items = [x for kv in v.items() for x in kv] if isinstance(v, dict) else v
    memo[key] = n = 2 + sum(_extent(x, memo) + 2 for x in items)
    return n


def _built(v):
    """Counts what an operation built (containers by what printing them would write)."""
    if isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
        raise _Refused(f"an integer of {v.bit_length():,} bits is over the limit of {MAX_INT_BITS:,}")
    if isinstance(v, (str, bytes, list, tuple, dict, set, frozenset)):
        n = _extent(v)
        _fits(n)
        _budget().built -= n
    return v


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.?)", re.S)


def _width(spec: str, what: str) -> int:
    if spec == "*":
        raise _Refused(f"{what}: a width taken from the arguments")
    n = int(spec or 0)
    if n > MAX_COUNT:
        raise _Refused(f"{what}: a width of {n:,} is over the limit of {MAX_COUNT:,}")
    return n


def _printf_size(fmt: str, args) -> int:
    """Longest result of fmt % args."""
    values = args if isinstance(args, tuple) else (args, *args.values()) if isinstance(args, dict) else (args,)
    memo: dict = {}
    longest = max((_extent(v, memo) for v in values), default=0)
    n = len(fmt)
    for m in _PRINTF.finditer(fmt):
        escapes = 4 if m[3] in ("r", "a") else 1  # repr may write one character as four
        n += max(_width(m[1], "%-format"), _width(m[2], "%-format"), longest * escapes)
    return n


def _sized(x):
    return isinstance(x, (str, bytes, list, tuple, dict))


def _call_args(f, args, kwargs):
    """inspect's binding of a call, or None where it does not bind (the call itself then raises)."""
    try:
        bound = inspect.signature(f).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return bound


def _check_str_method(s: str, name: str, a: dict) -> None:
    """Predicts the str methods that build more than they are given."""
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(a.get("width"), int):
        _fits(max(len(s), a["width"]), f"str.{name}")
    elif name == "expandtabs" and isinstance(a.get("tabsize"), int):
        _fits(len(s) + s.count("\t") * max(a["tabsize"], 0), "str.expandtabs")
    elif name == "replace":
        _check_replace(s, a.get("old"), a.get("new"), a.get("count", -1))
    elif name == "translate" and isinstance(a.get("table"), dict):
        longest = max((len(v) for v in a["table"].values() if isinstance(v, str)), default=1)
        _fits(len(s) * max(longest, 1), "str.translate")


def _check_replace(s, old, new, count) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        n = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _fits(len(s) + n * max(len(new) - len(old), 0), "replace")


def _check_join(sep: str, items: list) -> None:
    memo: dict = {}
    n = sum(len(x) if type(x) is str else _extent(x, memo) for x in items)
    _fits(n + len(sep) * max(len(items) - 1, 0), "join")


def _check_filter(name: str, a: dict) -> None:
    """Predicts the filters that build more than they are given; may replace an iterable argument by the
    list it yields (measured, then passed on)."""
    if name == "center" and isinstance(a["width"], int):
        _fits(max(len(str(a["value"])), a["width"]), "center")
    elif name == "indent":
        s, w = str(a["s"]), a["width"]
        _fits(len(s) + (s.count("\n") + 1) * (w if isinstance(w, int) else len(str(w))), "indent")
    elif name == "replace":
        _check_replace(str(a["s"]), a["old"], a["new"], a["count"])
    elif name == "join":
        from jinja2.filters import make_attrgetter

        a["value"] = items = list(a["value"])
        if a["attribute"] is not None:
            items = list(map(make_attrgetter(a["eval_ctx"].environment, a["attribute"]), items))
        _check_join(str(a["d"]), items)
    elif name == "format":
        _fits(_printf_size(str(a["value"]), a["kwargs"] or a["args"]), "format")
    elif name in ("striptags", "urlize", "wordwrap"):
        s = str(a.get("value", a.get("s")))
        if len(s) > MAX_REGEX_INPUT:
            raise _Refused(f"{name} of {len(s):,} characters is over the limit of {MAX_REGEX_INPUT:,}")
        if name == "wordwrap":
            _fits(len(s) * (1 + len(str(a["wrapstring"] or "\n"))), "wordwrap")
    elif name in ("batch", "slice"):
        n = a["linecount" if name == "batch" else "slices"]
        if isinstance(n, int) and n > MAX_COUNT:
            raise _Refused(f"{name} of {n:,} is over the limit of {MAX_COUNT:,}")
    elif name == "tojson":
        i = a["indent"]
        if i is not None and (i if isinstance(i, int) else len(str(i))) > MAX_INDENT:
            raise _Refused(f"tojson: an indent of {i!r} is over the limit of {MAX_INDENT}")
    elif name == "sum":
        a["iterable"] = items = list(a["iterable"])
        if isinstance(a["start"], (list, tuple)):
            # each step copies the sum so far: the copies, not the result, are what grows
            n = sum(len(x) for x in items if isinstance(x, (list, tuple)))
            _fits(n * len(items) // 2, "sum (of sequences, each step a copy)")


def _bounded_filter(name: str, f):
    signature = inspect.signature(f)
    passed = hasattr(f, "jinja_pass_arg")  # jinja passes a context, an environment or an eval context first
    # async_variant wrappers take an eval context their sync function's signature does not show
    shown = passed and next(iter(signature.parameters), None) in ("eval_ctx", "environment", "env", "context")
    skip, at = int(passed and not shown), int(passed)  # arguments not bound; where the value is in the call

    def bounded(*args, **kwargs):
        if name not in PREDICTED_FILTERS:
            if name not in WALKING_FILTERS and len(args) > at:
                _fits(_extent(args[at]), name)
            return _built(f(*args, **kwargs))
        try:
            bound = signature.bind(*args[skip:], **kwargs)
        except TypeError:
            return f(*args, **kwargs)  # raises the filter's own error
        bound.apply_defaults()
        _fits(_extent(list(bound.arguments.values())[int(shown)]), name)
        _check_filter(name, bound.arguments)
        return _built(f(*args[:skip], *bound.args, **bound.kwargs))

    return update_wrapper(bounded, f)


def _environment():
    """The sandbox with every hook bounded (built once: jinja imports take a while)."""
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, SecurityError
    from jinja2.runtime import Undefined
    from markupsafe import EscapeFormatter, Markup

    class Generator(CodeGenerator):
        """Routes the expressions that build values without an environment hook through one:
        `~` (str_join), slices and literals."""

        def visit_Concat(self, node, frame):
            if frame.eval_ctx.volatile:
                join = "(markup_join if context.eval_ctx.volatile else str_join)"
            else:
                join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
            self.write(f"environment.built({join}(environment.printable((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))))")

        def _wrapped(self, visit, node, frame):
            self.write("environment.built(")
            visit(self, node, frame)
            self.write(")")

        def visit_Getitem(self, node, frame):
            from jinja2 import nodes

            if isinstance(node.arg, nodes.Slice):
                self._wrapped(CodeGenerator.visit_Getitem, node, frame)
            else:
                super().visit_Getitem(node, frame)

        def visit_List(self, node, frame):
            self._wrapped(CodeGenerator.visit_List, node, frame)

        def visit_Dict(self, node, frame):
            self._wrapped(CodeGenerator.visit_Dict, node, frame)

        def visit_Tuple(self, node, frame):
            if node.ctx == "load":
                self._wrapped(CodeGenerator.visit_Tuple, node, frame)
            else:  # an assignment target
                super().visit_Tuple(node, frame)

    class Formatter(SandboxedFormatter):
        """str.format counting what it writes, field by field."""

        def format_field(self, value, format_spec):
            for n in re.findall(r"\d+", format_spec):
                _width(n, "str.format")
            _fits(_extent(value), "str.format")
            text = super().format_field(value, format_spec)
            self.written += len(text)
            _fits(self.written, "str.format")
            return text

    class EscapeFormatter_(Formatter, EscapeFormatter):
        pass

    class Sandbox(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self):
            super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=self.printable)
            del self.globals["lipsum"]  # lorem ipsum of any length; no chat template needs it
            for name, f in list(self.filters.items()):
                self.filters[name] = _bounded_filter(name, f)

        @staticmethod
        def built(v):
            return _built(v)

        @staticmethod
        def printable(v):
            """Before a value is written out: a container prints every item each time it holds it."""
            if not isinstance(v, str):
                _fits(_extent(v))
            return v

        def concat(self, parts):
            """Joins a macro's, a `{% set %}` block's or a `{% filter %}` block's output."""
            parts = list(parts)
            _fits(sum(len(p) if isinstance(p, str) else _extent(p) for p in parts))
            return _built("".join(parts))

        def getattr(self, obj, attribute):
            return self._private(super().getattr(obj, attribute), obj, attribute)

        def getitem(self, obj, argument):
            return self._private(super().getitem(obj, argument), obj, argument)

        def _private(self, value, obj, name):
            # a missing private name (range.__self__) would print as nothing, like any undefined
            if isinstance(name, str) and name.startswith("_") and isinstance(value, Undefined):
                self.unsafe_undefined(obj, name)
            return value

        def unsafe_undefined(self, obj, attribute):
            # jinja returns an undefined that prints as nothing: the template would go on without it
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def call_binop(self, context, operator, left, right):
            b = _budget()
            if time.monotonic() > b.deadline:
                raise _OutOfTime
            if operator == "+" and type(left) is str and type(right) is str:  # most binops of real templates
                n = len(left) + len(right)
                if n > b.chars or n > b.built:
                    _fits(n, "a sum")
                b.built -= n
                return left + right
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and abs(left) > 1 and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
                raise _Refused(f"{left} ** {right} is over the limit of {MAX_INT_BITS:,} bits")
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if _sized(seq) and isinstance(n, int):
                    _fits(_extent(seq) * max(n, 0), "a repetition")
            if operator == "+" and _sized(left) and _sized(right):
                memo: dict = {}
                _fits(_extent(left, memo) + _extent(right, memo), "a sum")
            if operator == "%" and isinstance(left, str):
                _fits(_printf_size(left, right), "%-format")
            return _built(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's names: no clash with kwargs)
            _tick()
            # str's methods, and Markup's (Python wrappers around them): bound by str's own signatures
            if isinstance(__obj, (types.BuiltinMethodType, types.MethodType)) and isinstance(__obj.__self__, str):
                s, name = __obj.__self__, __obj.__name__
                if name in ("format", "format_map"):
                    # reached without getattr (jinja before 3.1.6 let the attr filter return it raw)
                    return __self.call(__context, __self.wrap_str_format(__obj), *args, **kwargs)
                if name == "join" and len(args) == 1 and not kwargs:
                    args = (list(args[0]),)
                    _check_join(s, args[0])
                elif name in ("center", "ljust", "rjust", "zfill", "expandtabs", "replace", "translate"):
                    bound = _call_args(getattr(str, name), (s, *args), kwargs)
                    if bound is not None:
                        _check_str_method(s, name, bound.arguments)
            return _built(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value):
            if not (isinstance(value, (types.MethodType, types.BuiltinMethodType))
                    and value.__name__ in ("format", "format_map") and isinstance(value.__self__, str)):
                return None
            fmt, as_map = value.__self__, value.__name__ == "format_map"

            def format_(*args, **kwargs):
                if as_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one argument")
                    args, kwargs = (), args[0]
                f = EscapeFormatter_(self, escape=fmt.escape) if isinstance(fmt, Markup) else Formatter(self)
                f.written = 0
                return _built(type(fmt)(f.vformat(fmt, args, kwargs)))

            return update_wrapper(format_, value)

    return Sandbox


def _tick() -> None:
    if time.monotonic() > _budget().deadline:
        raise _OutOfTime


def _trace(frame, event, arg):
    # every call, and every line of the template's own code: loops that write nothing stop too
    if time.monotonic() > _state.budget.deadline:
        raise _OutOfTime
    return _trace if frame.f_code.co_filename == "<template>" else None


_SANDBOX = None
_Namespace: type = type("_NotImported", (), {})  # jinja2.utils.Namespace once jinja is imported


class ChatTemplate:
    def __init__(self, source: str | None, bos: str = "", eos: str = "", origin: str | None = None):
        """origin: the file the template came from, for messages."""
        global _SANDBOX, _Namespace
        self.bos, self.eos = bos, eos
        self.where = f"{origin}: chat template" if origin else "chat template"
        source = CHATML if source is None else source
        if len(source) > MAX_SOURCE:
            raise TemplateError(f"{self.where}: {len(source):,} characters is over the limit of {MAX_SOURCE:,}")
        if _SANDBOX is None:
            from jinja2.utils import Namespace

            _SANDBOX, _Namespace = _environment(), Namespace
        env = _SANDBOX()
        env.globals["raise_exception"] = self._raise
        self.template = self._bounded(lambda: env.from_string(source), MAX_OUTPUT, "does not compile",
                                      f"does not compile in {MAX_SECONDS:g} s")

    def _raise(self, message):
        _fits(_extent(message))
        raise TemplateError(f"{self.where}: {' '.join(str(message).splitlines())}")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """extra: more variables for the template (tools=[...], as HF's apply_chat_template)."""
        # twice the input: a template may write a message twice (a system prompt, say)
        limit = MAX_OUTPUT + 2 * _extent([messages, extra])
        context = dict(extra, messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos,
                       eos_token=self.eos)
        return self._bounded(lambda: self._stream(limit, **context), limit, "failed",
                             f"stopped after {MAX_SECONDS:g} s (a loop that does not end?)")

    def _stream(self, limit: int, **context) -> str:
        parts, n = [], 0
        chunks = self.template.generate(**context)
        try:
            for chunk in chunks:
                n += len(chunk)
                if n > limit:
                    raise _Refused(f"the prompt is longer than {limit:,} characters")
                parts.append(chunk)
        finally:
            chunks.close()
        return "".join(parts)

    def _bounded(self, run, chars: int, failed: str, late: str):
        outer = getattr(_state, "budget", None)
        _state.budget = _Budget(chars)
        tracer = sys.gettrace()
        sys.settrace(_trace)
        try:
            return run()
        except TemplateError:
            raise
        except _OutOfTime:
            raise TemplateError(f"{self.where} {late}") from None
        except _Refused as e:
            raise TemplateError(f"{self.where}: refused: {e}") from None
        except RecursionError:
            raise TemplateError(f"{self.where}: {failed}: nested too deeply") from None
        except MemoryError:
            raise TemplateError(f"{self.where}: {failed}: out of memory") from None
        except Exception as e:  # a template is code from the model file: any failure is its failure
            from jinja2.exceptions import SecurityError

            if isinstance(e, SecurityError):
                raise TemplateError(f"{self.where}: refused: {e}") from None
            raise TemplateError(f"{self.where} {failed}: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(tracer)
            _state.budget = outer


def template_for(tok, origin: str | None = None) -> ChatTemplate:
    info = tok.info
    bos = tok.decode([info.bos_id]) if info.bos_id is not None else ""
    eos = tok.decode([info.eos_ids[0]]) if info.eos_ids else ""
    return ChatTemplate(info.chat_template, bos, eos, origin)
@dataclass
class Conversation:
    """History plus a session whose cache follows it, so each turn evaluates only the new tokens."""
    session: Session
    template: ChatTemplate
    messages: list[dict] = field(default_factory=list)
    reserve: int = 256  # tokens kept free for the reply when trimming history
    dropped: int = 0  # messages the last turn had to drop to fit the context

    def prompt_ids(self) -> tuple[list[int], int]:
        """Token ids of the history with the generation prompt; drops the oldest turns (never the system
        message nor the newest user message) until it fits. Returns the ids and how many messages went."""
        limit = self.session.model.max_context - min(self.reserve, self.session.model.max_context // 2)
        dropped = 0
        while True:
            ids = self.encode(self.messages)
            if len(ids) <= limit:
                return ids, dropped
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                raise ContextError(f"the message is {len(ids)} tokens; the context holds "
                                   f"{self.session.model.max_context} with {self.reserve} kept for the reply")
            del self.messages[first]
            dropped += 1

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages)
        tok = self.session.tok
        # Templates that write the BOS text themselves must not get a second one.
        add_bos = tok.info.add_bos and not (self.template.bos and text.startswith(self.template.bos))
        return tok.encode(text, add_bos=add_bos, special=True)

    def reply(self, user: str, params: SamplingParams, max_tokens: int, stats: Stats) -> Iterator[str]:
        """Streams the assistant's answer; what was streamed joins the history even if interrupted."""
        self.messages.append({"role": "user", "content": user})
        try:
            ids, self.dropped = self.prompt_ids()
        except ContextError:
            self.messages.pop()
            raise
        parts: list[str] = []
        try:
            for piece in self.session.stream(ids, params, max_tokens, stats=stats):
                parts.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(parts)})
