"""Chat templates are code from model files: the known sandbox escapes are refused, and templates that
loop forever or build gigabytes are stopped, each with a one-line TemplateError; real templates render
exactly as jinja2's own sandbox renders them."""
import functools
import resource
import sys
import threading
import time

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine import chat
from engine.chat import CHATML, ChatTemplate, TemplateError
from tiny_models import CHAT_TEMPLATE

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def refused(source, match, messages=MESSAGES, origin="model.gguf"):
    """Renders source, expecting a one-line TemplateError naming the file and matching `match`; returns
    the seconds it took and how much the process's peak memory grew (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(TemplateError) as e:
        ChatTemplate(source, origin=origin).render(messages)
    seconds = time.monotonic() - t0
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{origin}: chat template"), text
    assert match in text, text
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024


ATTRIBUTE_WALKS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",  # jinja alone prints nothing for this and goes on
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ range.__self__ }}",  # missing, yet private: refused rather than printed as nothing
    "{{ raise_exception.__func__.__globals__ }}",
    "{{ messages['__class__'] }}",
    "{{ (messages|attr('__class__')) }}",
    "{{ messages[0].__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append(1) %}",  # mutation: the immutable sandbox
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{x.__class__}'.format_map({'x': 1}) }}",
    "{{ '%s'|format(messages.__class__) }}",
    "{{ ''['__class__'] }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ messages|selectattr('__class__')|list }}",
    "{{ messages|sort(attribute='__class__') }}",
    "{{ '{0[__class__]}'.format(messages) }}",
    "{% set f = '{0.__globals__}'.format %}{{ f(raise_exception) }}",  # a format method held, called later
    "{{ ('{0.__class__}'|attr('format'))(1) }}",
    "{{ ''.join.__self__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ loop.__class__ }}{% for x in [1] %}{{ loop.__class__ }}{% endfor %}",
]


@pytest.mark.parametrize("source", ATTRIBUTE_WALKS)
def test_attribute_walks_are_refused(source):
    refused(source, "unsafe")


@pytest.mark.parametrize("source, match", [
    ("{{ lipsum(5) }}", "'lipsum' is undefined"),  # removed: lorem ipsum of any length
    ("{{ lipsum.__globals__ }}", "'lipsum' is undefined"),
    ("{% include '/etc/passwd' %}", "no loader"),
    ("{% import 'os' as os %}", "no loader"),
    ("{% extends 'base.html' %}", "no loader"),
])
def test_no_lipsum_no_files(source, match):
    refused(source, match)


BOMBS = [  # each would build gigabytes; the match names the limit that stopped it
    ("{{ 'x' * 10**10 }}", "a repetition of 10,000,000,000"),
    ("{{ 'x' * 10000000000 }}", "a repetition"),  # a literal: jinja folds constants at compile time
    ("{% for i in range(100000) %}{{ 'x'*100000 }}{% endfor %}", "the prompt is longer than"),
    ("{{ messages * 1000000 }}", "a repetition"),
    ("{{ ['x' * 1000000] * 1000 }}", "a repetition"),  # a thousand references, printed
    ("{{ 2 ** 100000000 }}", "bits"),
    ("{{ 10 ** (10 ** 10) }}", "bits"),  # jinja reads 10 ** 10 ** 10 as (10 ** 10) ** 10
    ("{{ range(10**9)|list }}", "MAX_RANGE"),
    ("{{ 'x'|center(1000000000) }}", "center of 1,000,000,000"),
    ("{{ 'x'.center(1000000000) }}", "str.center"),
    ("{{ 'x'.ljust(10**9) }}", "str.ljust"),
    ("{{ ('x' * 1000000)|replace('x', 'x' * 1000000) }}", "replace"),
    ("{{ ('x' * 1000000).replace('x', 'xxx') }}", "replace"),
    ("{{ ('\t' * 1000000).expandtabs(1000000) }}", "str.expandtabs"),
    ("{{ ('x' * 1000000).join('y' * 1000000) }}", "join"),
    ("{{ ('x' * 1000)|join('y' * 1000000) }}", "join"),
    ("{{ ('x' * 1000000).translate({120: 'y' * 1000}) }}", "str.translate"),
    ("{{ (('x' * 1000000)|safe).join('y' * 1000000) }}", "join"),  # Markup's methods are Python wrappers
    ("{{ ('x'|safe).center(10**9) }}", "str.center"),
    ("{{ (('x' * 10)|safe).replace('x', 'y' * 1000000) }}", "replace of 10,000,000"),
    ("{{ ('a\n' * 100000)|indent(100000) }}", "indent"),
    ("{{ 'x'|indent(10**9) }}", "indent"),
    ("{{ '%999999999s'|format('x') }}", "a width of 999,999,999"),
    ("{{ '%999999999s' % 'x' }}", "a width of 999,999,999"),
    ("{{ '%*s' % (999999999, 'x') }}", "a width taken from the arguments"),
    ("{{ '%.999999999f'|format(1.0) }}", "a width"),
    ("{{ ('%s' * 100000)|format(*(['x' * 1000] * 100000)) }}", "a repetition"),
    ("{{ '{:>999999999}'.format('x') }}", "str.format: a width"),
    ("{{ '{:{w}}'.format('x', w=999999999) }}", "str.format: a width"),
    ("{{ ('{:99999}' * 100000).format(*range(100000)) }}", "str.format"),
    ("{{ '{0}'.format(['x' * 1000000] * 100) }}", "a repetition"),
    ("{{ ('x ' * 5000)|wordwrap(1, wrapstring='y' * 100000) }}", "wordwrap of 1,000,010,000"),
    ("{{ ('<' * 1000000)|striptags }}", "striptags of 1,000,000"),  # a quadratic regex
    ("{{ ('x ' * 100000)|urlize }}", "urlize of 200,000"),
    ("{{ range(10)|batch(10**9)|list }}", "batch of 1,000,000,000"),
    ("{{ range(10)|slice(10**9)|list }}", "slice of 1,000,000,000"),
    ("{{ messages|tojson(indent=10**9) }}", "an indent"),
    ("{{ dict.fromkeys(range(100000), 'x' * 1000000) }}", "over the limit"),
    ("{{ (range(20000)|batch(1)|list)|sum(start=[]) }}", "sum (of sequences"),  # quadratic copying
    ("{% set s = 'x' * 1000000 %}{{ [[s, s], [s, s]] }}", "a value of 4,000,"),
    # doubling: each step is small, the sum is not
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "over"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "a sum"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
     "{{ ns.l == ns.l[:] }}", "over the limit"),
    ("{% set a = ['x' * 100000] %}{% set b = [a, a] %}{% set c = [b, b] %}{% set d = [c, c] %}{% set e = [d, d] %}"
     "{% set f = [e, e] %}{{ f }}", "over the limit"),
    ("{% set s = 'x' * 1000000 %}{% set a = s[1:] %}{% set b = a[1:] %}" + "".join(
        f"{{% set v{i} = s[{i}:] %}}" for i in range(100)), "built more than"),  # many values, each small
    ("{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + ['x' * 1000000] %}"
     "{% endfor %}", "a sum"),
    # captured output (a {% set %} block, a macro) is joined at once, without passing the output limit
    ("{% set s = 'x' * 1000000 %}{% set y %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endset %}",
     "over the limit"),
    ("{% macro m(s) %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endmacro %}{{ m('x' * 1000000)|length }}",
     "over the limit"),
    ("{% set ns = namespace() %}{% set l = [ns] * 1000 %}{% set ns.a = 'x' * 1000000 %}{{ l }}", "over the limit"),
    ("{% for i in range(100000) %}{% set x = ['x' * 1000000] * 1 %}{% endfor %}", "built more than"),
]


@pytest.mark.parametrize("source, match", BOMBS)
def test_bombs_are_stopped(source, match):
    seconds, grew = refused(source, match)
    assert grew < 400, f"peak memory grew {grew:.0f} MB"
    assert seconds < 15


LOOPS = [  # each would run for hours; the outer range's calls, or the trace of the template's lines, stop it
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",  # no call in the loop
    # jinja's `is sequence` test catches Exception: the deadline must not be an Exception
    "{% for a in range(100000) %}{% for b in range(100000) %}{% if a is sequence %}{% endif %}{% endfor %}"
    "{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% set x = 'y' ~ b %}{% endfor %}{% endfor %}",
]


@pytest.mark.parametrize("source", LOOPS)
def test_endless_loops_stop_at_the_deadline(source, monkeypatch):
    monkeypatch.setattr(chat, "MAX_SECONDS", 0.5)
    seconds, _ = refused(source, "chat template stopped after 0.5 s (a loop that does not end?)")
    assert seconds < 15  # generous: a loaded 2-core machine


def test_default_deadline_is_seconds():
    assert 2 <= chat.MAX_SECONDS <= 5
    seconds, _ = refused(LOOPS[0], f"stopped after {chat.MAX_SECONDS:g} s")
    assert chat.MAX_SECONDS <= seconds < chat.MAX_SECONDS + 15


def test_a_raw_format_method_is_sandboxed_too():
    """jinja before 3.1.6 let the attr filter hand out str.format unwrapped (CVE-2025-27516); a call
    of one is sandboxed however it was reached."""
    t = ChatTemplate("{{ f(messages) }}")
    with pytest.raises(TemplateError, match="unsafe"):
        t.render([], f="{0.__class__}".format)


def test_endless_recursion_is_refused():
    refused("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "nested too deeply")


def test_compiling_has_the_deadline_too(monkeypatch):
    monkeypatch.setattr(chat, "MAX_SECONDS", 0.05)  # the largest source allowed takes a second or more
    with pytest.raises(TemplateError, match=r"^chat template does not compile in 0\.05 s$"):
        ChatTemplate("{{ 1 }}" * (chat.MAX_SOURCE // 7))


def test_bad_source_is_refused_at_load():
    for source, match in [("x" * (chat.MAX_SOURCE + 1), "over the limit"),
                          ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "does not compile"),
                          ("{% for %}", "does not compile: TemplateSyntaxError")]:
        with pytest.raises(TemplateError, match=match) as e:
            ChatTemplate(source, origin="tokenizer_config.json")
        assert "\n" not in str(e.value) and str(e.value).startswith("tokenizer_config.json: chat template")


def test_raise_exception_names_the_file():
    with pytest.raises(TemplateError, match=r"^m\.gguf: chat template: no system role$"):
        ChatTemplate("{{ raise_exception('no system role') }}", origin="m.gguf").render(MESSAGES)


# A template in the style of the models' own (namespace, macros, filters, formats, slices, literals),
# to show that the bounded sandbox changes nothing a real template sees.
RICH = """
{%- set ns = namespace(system=none, last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- macro content(c) -%}{%- if c is string -%}{{ c | trim }}{%- else -%}
  {%- for part in c -%}{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}
{%- else -%}{%- set rest = messages -%}{%- endif -%}
{%- if tools is defined and tools -%}{{ '<|im_start|>system\n' ~ (ns.system or 'You are helpful.') ~ '\n# Tools\n' }}
  {%- for t in tools -%}{{ t | tojson(indent=2) }}{{ '\n' }}{%- endfor -%}{{ '<|im_end|>\n' }}
{%- elif ns.system is not none -%}{{ '<|im_start|>system\n' + ns.system.strip() + '<|im_end|>\n' }}{%- endif -%}
{%- for m in rest -%}
  {%- if m.role not in ['user', 'assistant', 'tool'] -%}{{ raise_exception('unknown role ' ~ m.role) }}{%- endif -%}
  {{- '<|im_start|>%s\n'|format(m.role) -}}{{ content(m.content) }}
  {%- if loop.last and m.role == 'assistant' -%}{%- else -%}{{ '<|im_end|>' ~ '\n' }}{%- endif -%}
  {%- if m.content is string and m.content.startswith('!') -%}{{ '{}!'.format(m.content|length) }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}
{{- (messages|map(attribute='role')|join(','))|upper|replace(',', ';')|center(20) }}{{ messages|length }}
{{- messages|selectattr('role', 'equalto', 'user')|list|length }}{{ [1, 2, 3]|sum }}{{ (messages|last).role|title }}
{{- 'ab' * 3 }}{{ {'k': 1}|dictsort }}{{ range(3)|list }}{{ '%05.1f'|format(3.14159) }}{{ '{:>6}'.format('x') }}
{{- 2 ** 10 }}{{ messages[0].content[:5] }}{{ (1, 2) }}{{ ns.last_user }}{{ 'a\tb'.expandtabs(4) }}{{ 'x'.zfill(3) }}
{{- messages|batch(2)|list|length }}{{ 'abc'|wordwrap(2) }}{{ '<b>x</b>'|striptags }}{{ '%(a)s'|format(a=1) }}
"""


@functools.cache
def _catalog_templates() -> tuple[str, ...]:
    """The chat templates of the catalog's GGUFs that are in the cache (read from the files, not copied)."""
    from models import catalog
    from models.gguf_loader import read_gguf

    paths = [catalog.cache_dir() / "models" / f"{name}.gguf" for name in catalog.CATALOG]
    return tuple(md["tokenizer.chat_template"] for md, _ in (read_gguf(p) for p in paths if p.exists())
                 if "tokenizer.chat_template" in md)


CONVERSATIONS = [
    MESSAGES,
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "<|im_start|> 'quotes' \"and\" {{ braces }} %s {}"},
     {"role": "assistant", "content": "!ünïcödé\n\ttabs"}, {"role": "user", "content": "  again  "}],
    [{"role": "system", "content": "S"}] + [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " * 30}
                                            for i in range(41)],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_render_as_jinja_does(add_generation_prompt):
    templates = [CHAT_TEMPLATE, CHATML, RICH, *_catalog_templates()]
    for source in templates:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        reference = env.from_string(source)
        ours = ChatTemplate(source, bos="<s>", eos="</s>")
        for messages in CONVERSATIONS:
            want = reference.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token="<s>", eos_token="</s>")
            assert ours.render(messages, add_generation_prompt) == want


def test_tools_and_content_parts_render_as_jinja_does():
    messages = [{"role": "user", "content": [{"type": "text", "text": "part one "}, {"type": "image"},
                                             {"type": "text", "text": "part two"}]}]
    tools = [{"type": "function", "function": {"name": "f", "description": "does f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}}}}]
    for source in (RICH, *_catalog_templates()):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        for ms in (messages, MESSAGES):
            if source != RICH and ms is messages:
                continue  # content parts are RICH's own convention
            want = env.from_string(source).render(messages=ms, tools=tools, add_generation_prompt=True,
                                                  bos_token="<s>", eos_token="")
            assert ChatTemplate(source, bos="<s>").render(ms, tools=tools) == want


def test_limits_grow_with_the_messages():
    """A history longer than the output limit renders (the conversation then drops turns to fit the
    context): the limits are the messages' size plus MAX_OUTPUT."""
    big = "y" * (chat.MAX_OUTPUT + 1000)
    messages = [{"role": "user", "content": big}, {"role": "assistant", "content": big},
                {"role": "user", "content": "x"}]
    for source in (CHAT_TEMPLATE, RICH):
        text = ChatTemplate(source).render(messages)
        assert text.count(big) >= 2


def test_one_template_in_many_threads(monkeypatch):
    """Limits are per render: a template stopped in one thread does not stop the others."""
    monkeypatch.setattr(chat, "MAX_SECONDS", 2.0)  # the other renders, beside the loop, take milliseconds
    looping = ChatTemplate("{% if messages[0].content == 'loop' %}{% for i in range(100000) %}"
                           "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}{{ messages[0].content }}")
    want = [f"m{i}" for i in range(8)]
    got, errors = [None] * 8, []

    def run(i):
        try:
            for _ in range(20):
                got[i] = looping.render([{"role": "user", "content": want[i]}])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def loop():
        with pytest.raises(TemplateError, match="stopped after"):
            looping.render([{"role": "user", "content": "loop"}])

    threads = [threading.Thread(target=loop)] + [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want


def test_tracer_is_restored():
    seen = []

    def tracer(frame, event, arg):
        seen.append(event)

    sys.settrace(tracer)
    try:
        ChatTemplate(None).render(MESSAGES)
        with pytest.raises(TemplateError):
            ChatTemplate("{{ ''.__class__ }}").render(MESSAGES)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


def test_a_models_template_names_its_file(tmp_path):
    """engine.api passes the model's path: errors name where the template came from."""
    import json

    from engine import load
    from tiny_models import write_hf

    folder = write_hf(tmp_path / "hf")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ cycler.__init__.__globals__.os }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model = load(str(folder), dense=True)
    with pytest.raises(TemplateError, match=f"^{folder}: chat template: refused: access to attribute '__init__'"):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=1)
