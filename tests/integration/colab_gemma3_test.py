"""colabs/gemma3_finetuning.ipynb runs top to bottom, with gemma installed.

The integration environment has no Jupyter kernel, so the code cells run
in order in one namespace, which is what a kernel does for a notebook that
uses no magics. The notebook asserts its own facts (gemma's logits equal
ours, init equals the base, held-out loss falls, fused equals adapted).
"""

import json
import pathlib

NOTEBOOK = (pathlib.Path(__file__).resolve().parents[2] / 'colabs'
            / 'gemma3_finetuning.ipynb')


def test_gemma3_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cells = json.loads(NOTEBOOK.read_text())['cells']
  namespace = {'__name__': '__main__'}
  ran = 0
  for index, cell in enumerate(cells):
    if cell['cell_type'] != 'code':
      continue
    source = ''.join(cell['source'])
    assert not source.lstrip().startswith(('%', '!')), index  # no magics
    exec(compile(source, f'{NOTEBOOK.name} cell {index}', 'exec'), namespace)
    ran += 1
  assert ran == 7
  assert namespace['after'] < namespace['before']
