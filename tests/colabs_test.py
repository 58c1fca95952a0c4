"""The notebooks in `colabs/` run top to bottom, and are stored clean.

Each notebook asserts its own key facts in its cells (loss falls, merged ==
adapted, quantized bytes), so executing it is the test. Outputs are never
stored in git: a notebook is committed with empty outputs and no execution
counts.
"""

import pathlib

import nbclient
import nbformat
import pytest
import zmq

COLABS = pathlib.Path(__file__).resolve().parent.parent / 'colabs'
NOTEBOOKS = sorted(COLABS.glob('*.ipynb'))
# Notebooks that need gemma (metadata `peft.requires`) run in the
# integration environment instead: tests/integration/colab_gemma3_test.py.
IN_THIS_VENV = [p for p in NOTEBOOKS if 'gemma' not in nbformat.read(
    p, as_version=4).metadata.get('peft', {}).get('requires', [])]
# Each notebook runs in well under a minute on a laptop CPU; the limit only
# stops a hung cell on a loaded machine.
CELL_TIMEOUT_S = 300


def test_the_notebooks_are_there():
  assert [p.name for p in NOTEBOOKS] == [
      'gemma3_finetuning.ipynb', 'lora_finetuning.ipynb',
      'merge_and_serve.ipynb', 'quantization.ipynb']
  assert 'gemma3_finetuning.ipynb' not in [p.name for p in IN_THIS_VENV]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_and_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for index, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [], f'{path.name} cell {index} stores outputs'
      assert cell.execution_count is None, (
          f'{path.name} cell {index} stores an execution count')
    assert cell.source.strip(), f'{path.name} cell {index} is empty'


@pytest.mark.parametrize('path', IN_THIS_VENV, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
  # A kernel's ZMQ sockets can fail to start on a loaded machine; that is
  # the harness, not the notebook, so it gets one more try. A failing cell
  # (CellExecutionError) is never retried.
  for attempt in range(2):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
        resources={'metadata': {'path': str(tmp_path)}})
    try:
      client.execute()  # Raises CellExecutionError, naming the failing cell.
      break
    except zmq.error.ZMQError:
      if attempt:
        raise
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors
