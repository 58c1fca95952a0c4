"""Sphinx configuration: MyST pages, API reference from Google docstrings.

Build (warnings are errors):
  .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import pathlib
import re

import peft

project = 'peft'
author = 'the peft authors'
copyright = '2026, the peft authors'  # noqa: A001 (Sphinx's name)
release = version = getattr(peft, '__version__', '0.1.0')

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]
source_suffix = {'.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build']
myst_heading_anchors = 3

# Google-style docstrings; `x` in a docstring is code, as in the sources.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes as a field list of their class (autodoc documents members).
napoleon_use_ivar = True
default_role = 'code'
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_typehints_format = 'short'
autodoc_typehints_description_target = 'documented'
autodoc_default_options = {'members': True, 'show-inheritance': True}
# A class's docstring says what it is; __init__ docstrings are rare here.
autoclass_content = 'class'

html_theme = 'alabaster'
html_title = 'peft'
html_theme_options = {
    'description': 'Parameter-efficient fine-tuning for JAX and Flax.',
    'fixed_sidebar': True,
}

# Other pages of the docs may be added by other work (benchmarks, sharding);
# the index lists the ones present, so the build never points at a missing
# page nor leaves one out of the table of contents.
_OPTIONAL_PAGES = ('benchmarks', 'sharding')
_HERE = pathlib.Path(__file__).parent


def _list_optional_pages(app, docname, source):
  del app
  if docname != 'index':
    return
  present = [p for p in _OPTIONAL_PAGES if (_HERE / f'{p}.md').exists()]
  toctree = ('```{toctree}\n:maxdepth: 1\n:caption: Design notes\n\n'
             + '\n'.join(present) + '\n```\n') if present else ''
  source[0] = source[0].replace('<!-- design notes -->\n', toctree)


# Docstrings write code Markdown-style, `x`, also before a suffix
# (`LoRARule`s). reST needs ``x`` and an escaped space before a suffix.
_CODE = re.compile(r'(?<![`:\w])`([^`\n]+)`(?![`_])')


def _markdown_code_to_rst(app, what, name, obj, options, lines):
  del app, what, name, obj, options
  in_doctest = False
  for i, line in enumerate(lines):
    stripped = line.lstrip()
    if stripped.startswith(('>>>', '...')):
      in_doctest = True
    elif not stripped:
      in_doctest = False
    if in_doctest:
      continue
    lines[i] = _CODE.sub(lambda m, s=line: _literal(m, s), line)


def _literal(match, line):
  suffix = line[match.end():match.end() + 1]
  return f'``{match.group(1)}``' + ('\\ ' if suffix.isalnum() else '')


def setup(app):
  app.connect('source-read', _list_optional_pages)
  app.connect('autodoc-process-docstring', _markdown_code_to_rst)
