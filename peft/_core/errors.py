"""How peft's error messages say where a bad value was found.

Every message names the bad value, where it occurred and the fix; `at`
writes the "where" part the same way everywhere.
"""

from __future__ import annotations


def at(where: str) -> str:
  """" at 'where'" for a message, or '' when the place is unknown.

  Example:
    >>> f'bad rank 0{at("decoder/q")}.', f'bad rank 0{at("")}.'
    ("bad rank 0 at 'decoder/q'.", 'bad rank 0.')
  """
  return f' at {where!r}' if where else ''
