"""The README's quickstart runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def _python_blocks() -> list[str]:
  return re.findall(r'```python\n(.*?)```', README.read_text(), re.S)


def test_quickstart_runs(capsys):
  quickstart, = _python_blocks()[:1]
  assert len(quickstart.splitlines()) <= 45
  exec(compile(quickstart, str(README), 'exec'), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert re.search(r'\d+ trainable of [\d.]+K? \(\d+\.\d+%\)', out), out
  assert 'hidden [kernel]' in out and 'out [kernel]' in out
