"""A user's training data: plain text and JSONL rows, tokenized with loss
weights.

Three JSONL row forms, as torch-side fine-tuning tools read them:
`{"text": ...}` (every token is a target), `{"prompt": ..., "completion":
...}` (only the completion is) and `{"messages": [{"role": ..., "content":
...}, ...]}` with roles system/user/assistant, rendered with the model's
own chat template (ChatML or Gemma turns), where only the assistant turns
are targets. A `.txt` file is windowed into full-length text examples.

Each example is one row, right-padded to the context; the pads are no
target. Padding, not packing, because with right padding a causal model's
real tokens never attend to a pad, so the decoder needs no attention mask
and every example is trained exactly as it would be alone; the price is
the compute spent on pads. A bad row is an error naming its file and line,
or, with `skip_bad_rows`, skipped and counted: never a silent wrong batch.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from peft.models import _data
from peft.models import _tokenizer

ROLES = ('system', 'user', 'assistant')
_FORMS = {'text': ('text',), 'prompt': ('prompt', 'completion'),
          'messages': ('messages',)}


class DataError(ValueError):
  """A row of a data file that cannot become an example; names file:line.

  Example:
    >>> row_targets({'txt': 'typo'}, None, where='data.jsonl:7')
    Traceback (most recent call last):
    ...
    peft.models._examples.DataError: data.jsonl:7: a row needs exactly one \
of "text", "prompt" (with "completion") or "messages"; got keys ['txt'].
  """


@dataclasses.dataclass(frozen=True)
class Examples:
  """Tokenized examples of one length, with their loss weights.

  Example:
    >>> ex = Examples(np.array([[5, 6, 0], [7, 8, 9]], np.int32),
    ...               np.array([[1., 0.], [1., 1.]], np.float32),
    ...               ('a.jsonl:1', 'a.jsonl:2'))
    >>> len(ex), ex.target_tokens, ex.take([1]).sources
    (2, 3, ('a.jsonl:2',))

  Attributes:
    tokens: `(n, length)` int32 ids, right-padded (with the EOS id).
    weights: `(n, length - 1)` float32: 1 where `tokens[:, 1:]` is a
      target of the next-token loss, 0 for prompts, user turns and pads.
    sources: `'file:line'` of each example (`'file:window k'` for text).
    skipped: rows skipped as bad (with `skip_bad_rows`).
    rows: the parsed JSONL row of each example (None for text windows),
      for evaluations that need the reference answer (`answer_prompt`).
  """

  tokens: np.ndarray
  weights: np.ndarray
  sources: tuple[str, ...]
  skipped: int = 0
  rows: tuple[Any, ...] = ()

  def __len__(self) -> int:
    return len(self.tokens)

  @classmethod
  def text_windows(cls, tokens: np.ndarray, name: str) -> Examples:
    """Windows of plain text `(n, length)`: every predicted token a target.

    Example:
      >>> ex = Examples.text_windows(np.zeros((2, 4), np.int32), 'notes.txt')
      >>> ex.target_tokens, ex.sources
      (6, ('notes.txt:window 0', 'notes.txt:window 1'))
    """
    n, length = tokens.shape
    return cls(tokens, np.ones((n, length - 1), np.float32),
               tuple(f'{name}:window {k}' for k in range(n)), 0,
               (None,) * n)

  @property
  def target_tokens(self) -> int:
    """How many tokens the loss covers."""
    return int(self.weights.sum())

  def take(self, index: Any) -> Examples:
    """The examples at `index` (a slice or an index array)."""
    index = np.arange(len(self))[index]
    rows = tuple(self.rows[i] for i in index) if self.rows else ()
    return Examples(self.tokens[index], self.weights[index],
                    tuple(self.sources[i] for i in index), self.skipped,
                    rows)

  def split(self, fraction: float, *, seed: int = 0
            ) -> tuple[Examples, Examples]:
    """`(train, held out)`: a seeded random `fraction` of rows held out.

    Raises:
      ValueError: the split leaves no training example.
    """
    order = np.random.default_rng(seed).permutation(len(self))
    n_held = max(1, round(fraction * len(self)))
    if n_held >= len(self):
      raise ValueError(
          f'a held-out fraction of {fraction} leaves no training example '
          f'out of {len(self)}. Pass a smaller fraction or more data.')
    held = self.take(np.sort(order[:n_held]))
    # The skipped rows are counted once, with the training part.
    return (self.take(np.sort(order[n_held:])),
            dataclasses.replace(held, skipped=0))


def _fail(where: str, message: str) -> DataError:
  return DataError(f'{where}: {message}')


def _row_form(row: Any, where: str) -> str:
  if not isinstance(row, dict):
    raise _fail(where, f'a row must be a JSON object; got '
                f'{type(row).__name__} {row!r:.60}. Write one object per '
                'line: {"text": ...}, {"prompt": ..., "completion": ...} or '
                '{"messages": [...]}.')
  forms = [form for form, keys in _FORMS.items() if keys[0] in row]
  if len(forms) != 1:
    raise _fail(where, f'a row needs exactly one of "text", "prompt" (with '
                f'"completion") or "messages"; got keys {sorted(row)}.')
  form = forms[0]
  missing = [k for k in _FORMS[form] if k not in row]
  extra = sorted(set(row) - set(_FORMS[form]))
  if missing or extra:
    raise _fail(where, f'a {form!r} row has keys {list(_FORMS[form])}; got '
                f'{sorted(row)} (missing {missing}, unknown {extra}).')
  for key in _FORMS[form]:
    if key != 'messages':
      _check_text(row[key], key, where)
  return form


def _check_text(value: Any, name: str, where: str) -> str:
  if not isinstance(value, str):
    raise _fail(where, f'{name} must be a string; got '
                f'{type(value).__name__} {value!r:.60}.')
  if not value.strip():
    raise _fail(where, f'{name} is empty. Remove the row or give it text.')
  return value


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
  if not isinstance(messages, list) or not messages:
    raise _fail(where, f'"messages" must be a non-empty list; got '
                f'{messages!r:.60}.')
  out = []
  for i, message in enumerate(messages):
    at = f'{where} messages[{i}]'
    if not isinstance(message, dict) or set(message) != {'role', 'content'}:
      raise _fail(at, f'a message is {{"role": ..., "content": ...}}; got '
                  f'{message!r:.80}.')
    if message['role'] not in ROLES:
      raise _fail(at, f'unknown role {message["role"]!r}; roles are '
                  f'{list(ROLES)}.')
    _check_text(message['content'], 'content', at)
    out.append({'role': message['role'], 'content': message['content']})
  if not any(m['role'] == 'assistant' for m in out):
    raise _fail(where, 'the conversation has no assistant message, so '
                'nothing in it is a target. Add the reply to learn.')
  return out


def _chat_targets(tokenizer: _tokenizer.Tokenizer,
                  messages: list[dict[str, str]],
                  where: str) -> tuple[list[int], list[bool]]:
  """Token ids of the rendered chat and, per id, whether it is a target.

  An assistant turn's targets run from the end of the prompt that asks for
  it (`add_generation_prompt=True`) to the end of the turn, its end-of-turn
  token included, so the model learns to stop. The renders of each prefix
  must tokenize as prefixes of the whole, else the boundaries are unsure.
  """
  full = tokenizer.encode_chat(messages, add_generation_prompt=False)
  targets = [False] * len(full)
  for i, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    asked = tokenizer.encode_chat(messages[:i])
    answered = tokenizer.encode_chat(messages[:i + 1],
                                     add_generation_prompt=False)
    if (full[:len(asked)] != asked or full[:len(answered)] != answered):
      raise _fail(where, f'the chat template tokenizes messages[{i}] '
                  'differently inside the whole conversation, so its '
                  'targets cannot be found. Report it with this row.')
    for k in range(len(asked), len(answered)):
      targets[k] = True
  return full, targets


def row_targets(row: Any, tokenizer: _tokenizer.Tokenizer, *,
                where: str = 'row') -> tuple[list[int], list[bool]]:
  """Token ids of one JSONL row and, per id, whether the loss covers it.

  Example:
    >>> from tokenizers import pre_tokenizers
    >>> tok = _tokenizer.Tokenizer.from_bpe(
    ...     tokens=['<|endoftext|>'] + sorted(
    ...         pre_tokenizers.ByteLevel.alphabet()),
    ...     merges=[], special_ids=[0], eos_id=0)
    >>> ids, targets = row_targets({'prompt': 'Q', 'completion': 'A'}, tok)
    >>> [tok.decode([i], skip_special_tokens=False) for i in ids], targets
    (['Q', 'A', '<|endoftext|>'], [False, True, True])

  Args:
    row: a parsed JSONL row (see the module docstring for its forms).
    tokenizer: the model's tokenizer (its chat format renders messages).
    where: named in errors, e.g. `'data.jsonl:3'`.

  Raises:
    DataError: the row is malformed.
  """
  form = _row_form(row, where)
  eos = [tokenizer.eos_id]
  if form == 'text':
    ids = tokenizer.encode(row['text']) + eos
    return ids, [True] * len(ids)
  if form == 'prompt':
    prompt = tokenizer.encode(row['prompt'])
    completion = tokenizer.encode(row['completion'], add_bos=False) + eos
    return (prompt + completion,
            [False] * len(prompt) + [True] * len(completion))
  messages = _check_messages(row['messages'], where)
  if tokenizer.chat_format is None:
    raise _fail(where, 'a "messages" row needs a chat model, but this '
                'tokenizer has no chat format (ChatML or Gemma turns). Use '
                '"prompt"/"completion" rows.')
  try:
    return _chat_targets(tokenizer, messages, where)
  except ValueError as e:  # the template's own checks (Gemma turn order)
    if isinstance(e, DataError):
      raise
    raise _fail(where, str(e)) from None


def _pad(ids: list[int], targets: list[bool], length: int, pad_id: int):
  tokens = np.full(length, pad_id, np.int32)
  tokens[:len(ids)] = ids
  # weights[t] says whether tokens[t + 1] is a target.
  weights = np.zeros(length - 1, np.float32)
  weights[:len(ids) - 1] = np.asarray(targets[1:], np.float32)
  return tokens, weights


def load_examples(paths: Sequence[str | pathlib.Path],
                  tokenizer: _tokenizer.Tokenizer, *, length: int,
                  skip_bad_rows: bool = False) -> Examples:
  """Reads `.txt` and `.jsonl` files into padded examples of `length` ids.

  Example:
    >>> import tempfile, json
    >>> from tokenizers import pre_tokenizers
    >>> tok = _tokenizer.Tokenizer.from_bpe(
    ...     tokens=['<|endoftext|>'] + sorted(
    ...         pre_tokenizers.ByteLevel.alphabet()),
    ...     merges=[], special_ids=[0], eos_id=0)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 'data.jsonl'
    >>> _ = path.write_text(json.dumps({'prompt': 'Hi', 'completion': 'Yo'})
    ...                     + '\\n')
    >>> examples = load_examples([path], tok, length=8)
    >>> examples.tokens.shape, examples.weights[0].tolist()
    ((1, 8), [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])

  Args:
    paths: `.jsonl` files (one row per line; blank lines are ignored) or
      `.txt` files (plain text, cut into windows of `length` tokens).
    tokenizer: the model's tokenizer.
    length: ids per example (the context + 1, for next-token targets).
    skip_bad_rows: skip a malformed or too-long row (counted in
      `skipped`) instead of raising.

  Raises:
    FileNotFoundError: a path does not exist.
    DataError: a bad row (file:line in the message), an unknown file
      type, or no example at all.
  """
  tokens, weights, sources, rows, skipped = [], [], [], [], 0
  pad_id = tokenizer.eos_id
  for path in map(pathlib.Path, paths):
    if not path.is_file():
      raise FileNotFoundError(f'no data file at {str(path)!r}.')
    if path.suffix == '.txt':
      text = Examples.text_windows(_data.token_windows(
          tokenizer.encode(path.read_text(encoding='utf-8')), length=length),
                                   str(path))
      tokens.extend(text.tokens)
      weights.extend(text.weights)
      sources.extend(text.sources)
      rows.extend(text.rows)
      continue
    if path.suffix != '.jsonl':
      raise DataError(f'{path}: data files are .jsonl or .txt; got '
                      f'{path.suffix or "no suffix"!r}. Rename the file.')
    for line_no, line in enumerate(
        path.read_text(encoding='utf-8').splitlines(), 1):
      if not line.strip():
        continue
      where = f'{path}:{line_no}'
      try:
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise _fail(where, f'not JSON ({e.msg} at column {e.colno}).'
                      ) from None
        ids, targets = row_targets(row, tokenizer, where=where)
        if len(ids) > length:
          raise _fail(where, f'the example is {len(ids)} tokens; an '
                      f'example holds at most {length} (--seq-len + 1). '
                      'Shorten it or pass a longer --seq-len.')
      except DataError:
        if not skip_bad_rows:
          raise
        skipped += 1
        continue
      row_tokens, row_weights = _pad(ids, targets, length, pad_id)
      tokens.append(row_tokens)
      weights.append(row_weights)
      sources.append(where)
      rows.append(row)
  if not tokens:
    names = ', '.join(str(p) for p in paths) or 'no file'
    raise DataError(f'{names}: no example to train on ({skipped} bad rows '
                    'skipped). Check the files.')
  return Examples(np.stack(tokens), np.stack(weights), tuple(sources),
                  skipped, tuple(rows))


def answer_prompt(row: Any, tokenizer: _tokenizer.Tokenizer
                  ) -> tuple[list[int], str] | None:
  """`(prompt ids, reference answer)` of a row, for exact-match scoring.

  A chat row whose last message is the assistant's: the conversation
  before it, with the generation prompt, and that reply. A prompt/
  completion row: the prompt and the completion. Text rows (and text
  windows, `row=None`) have no answer: None.

  Example:
    >>> from tokenizers import pre_tokenizers
    >>> tok = _tokenizer.Tokenizer.from_bpe(
    ...     tokens=['<|endoftext|>'] + sorted(
    ...         pre_tokenizers.ByteLevel.alphabet()),
    ...     merges=[], special_ids=[0], eos_id=0)
    >>> ids, answer = answer_prompt({'prompt': 'Q:', 'completion': ' A'}, tok)
    >>> tok.decode(ids), answer
    ('Q:', ' A')
  """
  if not isinstance(row, dict):
    return None
  if 'prompt' in row:
    return tokenizer.encode(row['prompt']), row['completion']
  messages = row.get('messages')
  if not messages or messages[-1]['role'] != 'assistant':
    return None
  return tokenizer.encode_chat(messages[:-1]), messages[-1]['content']
