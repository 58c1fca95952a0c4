"""The README's quickstart runs as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def _python_blocks() -> list[str]:
  return re.findall(r'```python\n(.*?)```', README.read_text(), re.S)


def test_quickstart_runs(capsys):
  quickstart = _python_blocks()[0]
  code_lines = [line for line in quickstart.splitlines() if line.strip()]
  assert len(code_lines) <= 22, len(code_lines)
  ns = {}
  exec(compile(quickstart, str(README), 'exec'), ns)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert re.search(r'\d+ trainable of [\d.]+K? \(\d+\.\d+%\)', out), out
  assert 'layers_0 [kernel]' in out and 'layers_2 [kernel]' in out
  # Training helped, and the plain model on fused params serves the same.
  model, x = ns['model'], ns['x']
  target = np.sin(3 * np.asarray(x))
  base_loss = np.mean((model.apply({'params': ns['base']}, x) - target) ** 2)
  assert float(ns['loss'](ns['params'])) < 0.5 * base_loss
  with ns['surgery']:
    adapted = ns['model'].apply({'params': ns['params']}, ns['x'])
  served = ns['model'].apply({'params': ns['fused']}, ns['x'])
  np.testing.assert_allclose(served, adapted, rtol=1e-5, atol=1e-5)
