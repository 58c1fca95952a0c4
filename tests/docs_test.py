"""The docs stay complete and true.

* API reference: every name in `peft.__all__`, `peft.nnx.__all__` and
  `peft.models.__all__` has an autodoc entry in `docs/api/` and a docstring;
  no entry names anything else.
* Guides: every ```python block of a page runs, in order, in one namespace
  per page; a ```text block right after one is its exact output. Blocks
  written as ```{code-block} python are shown, not run (e.g. loading
  SmolLM2).
* The site builds with warnings as errors (`make docs` runs the same).
"""

import contextlib
import importlib
import inspect
import io
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
API_PAGES = {'peft': 'peft.md', 'peft.nnx': 'nnx.md',
             'peft.models': 'models.md'}
# The guides whose code this test runs (the design notes on benchmarks and
# sharding are tested by their own tests).
GUIDES = [DOCS / f'{name}.md' for name in (
    'getting_started', 'finetune', 'surgery', 'variants', 'fuse_and_serve',
    'quantization', 'nnx', 'checkpoints')]
# An autodoc directive (in an ```{eval-rst} block): .. autoclass:: peft.LoRA
_AUTODOC = re.compile(r'^\.\. auto(?:class|function|data|exception):: '
                      r'([\w.]+)\s*$', re.M)
# A fenced block: its info string and body (``` fences only).
_FENCE = re.compile(r'^```([^\n`]*)\n(.*?)^```\s*$', re.M | re.S)


def documented(module_name):
  text = (DOCS / 'api' / API_PAGES[module_name]).read_text()
  return _AUTODOC.findall(text)


@pytest.mark.parametrize('module_name', API_PAGES)
def test_every_public_name_has_an_api_entry(module_name):
  module = importlib.import_module(module_name)
  names = documented(module_name)
  qualified = {f'{module_name}.{n}' for n in module.__all__}
  missing = sorted(qualified - set(names))
  extra = sorted(set(names) - qualified)
  assert not missing, f'add to docs/api/{API_PAGES[module_name]}: {missing}'
  assert not extra, (f'docs/api/{API_PAGES[module_name]} documents names '
                     f'not in {module_name}.__all__: {extra}')
  assert len(names) == len(set(names)), 'a name is documented twice'


@pytest.mark.parametrize('module_name', API_PAGES)
def test_every_public_name_has_a_docstring(module_name):
  module = importlib.import_module(module_name)
  undocumented = [n for n in module.__all__
                  if not (inspect.getdoc(getattr(module, n)) or '').strip()]
  assert not undocumented, f'{module_name}: no docstring for {undocumented}'


@pytest.mark.parametrize('module_name', API_PAGES)
def test_every_public_name_has_a_runnable_example(module_name):
  # The examples run as doctests in `make test` (pyproject's addopts).
  module = importlib.import_module(module_name)
  without = [n for n in module.__all__
             if '>>>' not in (inspect.getdoc(getattr(module, n)) or '')]
  assert not without, f'{module_name}: no example (>>>) for {without}'


def test_api_pages_are_in_the_toctree():
  index = (DOCS / 'api' / 'index.md').read_text()
  for page in API_PAGES.values():
    assert page.removesuffix('.md') in index


def blocks(page):
  """`(info, body)` of each fenced block of a page, in order."""
  return [(m.group(1).strip(), m.group(2))
          for m in _FENCE.finditer(page.read_text())]


@pytest.mark.parametrize('page', GUIDES, ids=lambda p: p.stem)
def test_guide_code_runs_and_shows_its_output(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {'__name__': f'docs_{page.stem}'}
  found = blocks(page)
  ran = 0
  for i, (info, body) in enumerate(found):
    if info != 'python':
      continue
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(body, f'{page.name} block {i}', 'exec'), namespace)  # noqa: S102
    ran += 1
    if i + 1 < len(found) and found[i + 1][0] == 'text':
      assert out.getvalue().strip() == found[i + 1][1].strip(), (
          f'{page.name} block {i}: the ```text block after it is not its '
          f'output; it printed:\n{out.getvalue()}')
  assert ran, f'{page.name} has no runnable ```python block'


def test_docs_build_with_warnings_as_errors(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b',
       'html', str(DOCS), str(tmp_path / 'html')],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
