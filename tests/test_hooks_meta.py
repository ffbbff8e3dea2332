"""Every hook in runtime/hookspecs.py has a test, a documented signature and a full docstring.

A test declares which hooks it exercises with ``@pytest.mark.hook("loopwright_...")``; docs/plugins.md
gives each hook a section headed by its exact signature, e.g. ``### `loopwright_verdict(run, ...)` ``.
Add a hook, and these tests fail until both exist.
"""

import ast
import inspect
import re
import types
from pathlib import Path

import pytest

from loopwright.runtime import hookspecs
from loopwright.runtime.config import Settings
from loopwright.runtime.plugin_host import make_plugin_host

TESTS = Path(__file__).resolve().parent
DOCS = TESTS.parent / "docs" / "plugins.md"
HEADING = re.compile(r"^#{2,4} `(loopwright_\w+)\((.*?)\)`\s*$", re.MULTILINE)


def hook_specs() -> dict:
    return {name: fn for name, fn in vars(hookspecs).items() if hasattr(fn, f"{hookspecs.PROJECT}_spec")}


def signature(hook) -> str:
    return f"{hook.__name__}({', '.join(inspect.signature(hook).parameters)})"


def hooks_marked_in(source: str) -> set[str]:
    """The hook names given to @pytest.mark.hook(...) on the test functions of a test module."""
    marked = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.hook":
                    marked |= {arg.value for arg in decorator.args if isinstance(arg, ast.Constant)}
    return marked


def hooks_with_tests() -> set[str]:
    return {hook for path in TESTS.glob("test_*.py") if path != Path(__file__).resolve()
            for hook in hooks_marked_in(path.read_text(encoding="utf-8"))}


def documented_signatures(markdown: str) -> dict[str, str]:
    return {m.group(1): f"{m.group(1)}({m.group(2)})" for m in HEADING.finditer(markdown)}


def untested(hooks: dict, tested: set[str]) -> list[str]:
    return sorted(set(hooks) - tested)


def undocumented(hooks: dict, markdown: str) -> list[str]:
    """Hooks whose exact signature heads no section of the docs, each with the heading it needs."""
    documented = documented_signatures(markdown)
    return [f"### `{signature(hook)}`" for name, hook in sorted(hooks.items()) if documented.get(name) != signature(hook)]


HOOKS = hook_specs()


def test_the_hookspec_module_defines_hooks():
    assert len(HOOKS) >= 10 and all(name.startswith("loopwright_") for name in HOOKS)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_a_test(name):
    assert name in hooks_with_tests(), (
        f"no test exercises {name}: write one, and mark it @pytest.mark.hook({name!r})"
    )


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_a_documented_signature(name):
    assert not undocumented({name: HOOKS[name]}, DOCS.read_text(encoding="utf-8")), (
        f"docs/plugins.md needs a section headed ### `{signature(HOOKS[name])}` with an example"
    )


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_docstring_describes_when_it_fires_and_each_parameter(name):
    doc = inspect.getdoc(HOOKS[name]) or ""
    assert doc.split("\n\n")[0].strip(), f"{name} has no docstring"
    missing = [p for p in inspect.signature(HOOKS[name]).parameters if f":param {p}:" not in doc]
    assert not missing, f"{name}'s docstring lacks :param {missing[0]}:"


def documented_example(markdown: str, name: str) -> str:
    """The first Python block of the section headed by the hook's signature."""
    sections = re.split(r"^#{2,4} ", markdown, flags=re.MULTILINE)
    section = next(s for s in sections if s.startswith(f"`{name}("))
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_documented_example_is_a_plugin_loopwright_accepts(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPWRIGHT_LOAD_PLUGINS", "")
    module = types.ModuleType(f"example_{name}")
    exec(compile(documented_example(DOCS.read_text(encoding="utf-8"), name), f"docs/plugins.md ({name})", "exec"),
         module.__dict__)
    host = make_plugin_host(Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"), (module,))
    # Registering checks the implementation's arguments against the spec; start-up runs registration hooks.
    assert name in next(p.hooks for p in host.plugins() if p.module == module.__name__)


def test_every_hook_a_test_marks_exists():
    unknown = hooks_with_tests() - set(HOOKS)
    assert not unknown, f"tests mark hooks that runtime/hookspecs.py does not define: {sorted(unknown)}"


def test_the_docs_document_no_hook_that_does_not_exist():
    stale = set(documented_signatures(DOCS.read_text(encoding="utf-8"))) - set(HOOKS)
    assert not stale, f"docs/plugins.md documents hooks that no longer exist: {sorted(stale)}"


# --- the checks themselves, on a hook added without a test or docs ---------------------------------


@hookspecs.hookspec
def loopwright_new_hook(run, reason):
    """Fires in a test only."""


def test_a_hook_that_no_test_marks_is_reported_as_untested():
    source = '@pytest.mark.hook("loopwright_run_started")\ndef test_something():\n    pass\n'
    hooks = {"loopwright_new_hook": loopwright_new_hook, "loopwright_run_started": HOOKS["loopwright_run_started"]}
    assert untested(hooks, hooks_marked_in(source)) == ["loopwright_new_hook"]


def test_a_hook_documented_with_another_signature_is_reported_with_the_heading_it_needs():
    docs = "## Hooks\n\n### `loopwright_new_hook(run)`\n\nAn old signature.\n"
    assert undocumented({"loopwright_new_hook": loopwright_new_hook}, docs) == ["### `loopwright_new_hook(run, reason)`"]
