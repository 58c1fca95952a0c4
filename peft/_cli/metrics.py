"""The metrics JSONL `finetune` writes as it trains, a line per event.

Each line is a JSON object: `{"step", "loss", "lr", "tokens_per_s",
"target_tokens"}` after an optimizer step, `{"step", "eval_loss",
"eval_perplexity"}` after a held-out evaluation. Lines are flushed as they
are written, so `tail -f` follows a run; a resumed run keeps the lines up
to its checkpoint's step and carries on after them.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, TextIO


class MetricsLog:
  """Appends metric lines to a JSONL file.

  Example:
    >>> import tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 'metrics.jsonl'
    >>> with MetricsLog(path) as log:
    ...   log.write(step=1, loss=2.5)
    ...   log.write(step=2, loss=2.0)
    >>> with MetricsLog(path, resume_after=1) as log:  # Drops step 2.
    ...   log.write(step=2, loss=1.5)
    >>> [json.loads(line)['loss'] for line in path.read_text().splitlines()]
    [2.5, 1.5]
  """

  def __init__(self, path: pathlib.Path, *, resume_after: int | None = None):
    """Starts `path` afresh or, with `resume_after`, keeps its lines up to
    that step (a missing or unreadable file starts empty)."""
    kept = []
    if resume_after is not None and path.is_file():
      for line in path.read_text().splitlines():
        try:
          step = json.loads(line)['step']
        except (ValueError, KeyError, TypeError):
          continue  # A line cut short when the run stopped.
        if isinstance(step, int) and step <= resume_after:
          kept.append(line + '\n')
    self._file: TextIO = path.open('w')
    self._file.writelines(kept)
    self._file.flush()

  def write(self, **values: Any) -> None:
    finite = {k: (v if not isinstance(v, float) or math.isfinite(v)
                  else str(v)) for k, v in values.items()}
    self._file.write(json.dumps(finite) + '\n')
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class NullLog(MetricsLog):
  """A `MetricsLog` that writes nothing: a multi-process run's processes
  other than 0."""

  def __init__(self):  # pylint: disable=super-init-not-called
    pass

  def write(self, **values: Any) -> None:
    del values

  def close(self) -> None:
    pass
