"""Byte-level BPE tokenizer (Radford et al. 2019; Sennrich et al. 2016).

Built with the `tokenizers` package from a vocabulary and merge list, as a
GGUF file stores them, or read from a `tokenizer.json`; nothing is fetched
from a hub. `chat_prompt` writes the ChatML turns that SmolLM2 and many
other instruction-tuned models were trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import pathlib
import re

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

# How text is split into words before BPE, by llama.cpp's `tokenizer.ggml.pre`
# name. The StarCoder family (SmolLM among it) splits digits one by one.
_DIGITS_THEN_BYTES = ('smollm', 'starcoder', 'refact')
_BYTES_ONLY = ('gpt2', 'default')
PRE_TOKENIZERS = _BYTES_ONLY + _DIGITS_THEN_BYTES

_IM_START, _IM_END = '<|im_start|>', '<|im_end|>'
_SYSTEM_IN_TEMPLATE = re.compile(
  re.escape(_IM_START) + r'system\n(.*?)' + re.escape(_IM_END), re.DOTALL)

Message = Mapping[str, str]


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        use_regex=True)
  if name in _BYTES_ONLY:
    return byte_level
  if name in _DIGITS_THEN_BYTES:
    return pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level])
  raise ValueError(
    f'pre_tokenizer {name!r} is not supported; supported: {PRE_TOKENIZERS}. '
    'Pass one of those, or build a tokenizers.Tokenizer yourself and wrap '
    'it with Tokenizer(...).')


def system_prompt_from_template(template: str | None) -> str | None:
  """The system turn a ChatML chat template inserts by default, if any.

  Example:
    >>> system_prompt_from_template(
    ...     "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}")
    'Be brief.'
  """
  if not template:
    return None
  match = _SYSTEM_IN_TEMPLATE.search(template)
  # Undo the escapes `chatml_template` writes inside the Jinja string.
  return re.sub(r"\\([\\'])", r'\1', match.group(1)) if match else None


def chatml_template(default_system_prompt: str | None = None) -> str:
  """A Jinja chat template (HF `tokenizer_config.json`) for `chat_prompt`.

  Rendered by Hugging Face's `apply_chat_template`, it writes the same
  ChatML text as `Tokenizer.chat_prompt`, including the default system
  turn; `system_prompt_from_template` reads that turn back.

  Example:
    >>> system_prompt_from_template(chatml_template("Be 'brief'."))
    "Be 'brief'."
  """
  system = ''
  if default_system_prompt is not None:
    quoted = default_system_prompt.replace('\\', '\\\\').replace("'", "\\'")
    system = ("{% if loop.first and messages[0]['role'] != 'system' %}"
              f"{{{{ '{_IM_START}system\n{quoted}{_IM_END}\n' }}}}"
              '{% endif %}')
  return ('{% for message in messages %}' + system
          + f"{{{{ '{_IM_START}' + message['role'] + '\n' + "
          f"message['content'] + '{_IM_END}' + '\n' }}}}"
          '{% endfor %}{% if add_generation_prompt %}'
          f"{{{{ '{_IM_START}assistant\n' }}}}{{% endif %}}")


class Tokenizer:
  """Text <-> token ids, with special tokens kept whole.

  Args:
    backend: the `tokenizers.Tokenizer` doing the work.
    eos_id: id that ends a sequence (sampling stops there).
    bos_id: id prepended when `add_bos`.
    add_bos: whether `encode` prepends `bos_id` by default.
    default_system_prompt: system turn `chat_prompt` inserts when the
      conversation does not start with one (as SmolLM2's template does).

  Example:
    >>> alphabet = pre_tokenizers.ByteLevel.alphabet()
    >>> tok = Tokenizer.from_bpe(
    ...     tokens=['<|endoftext|>'] + sorted(alphabet) + ['hi'],
    ...     merges=['h i'], special_ids=[0], eos_id=0)
    >>> ids = tok.encode('hi!')
    >>> ids[0] == tok.vocab_size - 1, tok.decode(ids)
    (True, 'hi!')
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, eos_id: int,
               bos_id: int | None = None, add_bos: bool = False,
               default_system_prompt: str | None = None):
    vocab_size = backend.get_vocab_size()
    for name, value in (('eos_id', eos_id), ('bos_id', bos_id)):
      if value is not None and not 0 <= value < vocab_size:
        raise ValueError(
          f'Tokenizer {name}={value!r} is outside the vocabulary of '
          f'{vocab_size} tokens. Pass an id in [0, {vocab_size}).')
    if add_bos and bos_id is None:
      raise ValueError('Tokenizer add_bos=True needs a bos_id; got None.')
    self.backend = backend
    self.eos_id = eos_id
    self.bos_id = bos_id
    self.add_bos = add_bos
    self.default_system_prompt = default_system_prompt

  @classmethod
  def from_bpe(cls, *, tokens: Sequence[str],
               merges: Iterable[str | tuple[str, str]],
               special_ids: Iterable[int], eos_id: int,
               pre_tokenizer: str = 'gpt2', **kwargs) -> Tokenizer:
    """Builds a byte-level BPE from a vocabulary and merges.

    Args:
      tokens: token strings in the byte-level alphabet, by id.
      merges: `'a b'` strings or `(a, b)` pairs, highest priority first.
      special_ids: ids of control tokens (`<|im_end|>`...) matched whole.
      eos_id: see the class.
      pre_tokenizer: a `PRE_TOKENIZERS` name.
      **kwargs: `bos_id`, `add_bos`, `default_system_prompt`.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError(
        f'the vocabulary repeats tokens ({len(tokens)} entries, '
        f'{len(vocab)} distinct); each token must appear once.')
    pairs = []
    for merge in merges:
      pair = tuple(merge.split(' ')) if isinstance(merge, str) else merge
      if len(pair) != 2:
        raise ValueError(
          f'BPE merge {merge!r} must be two tokens separated by one space.')
      pairs.append(pair)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    backend.pre_tokenizer = _pre_tokenizer(pre_tokenizer)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([
      tokenizers.AddedToken(tokens[i], special=True, normalized=False)
      for i in special_ids
    ])
    return cls(backend, eos_id=eos_id, **kwargs)

  @classmethod
  def from_file(cls, path: str | pathlib.Path, *, eos_id: int,
                **kwargs) -> Tokenizer:
    """Reads a `tokenizer.json`; other arguments as in the class."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(
        f'no tokenizer file at {str(path)!r}. Pass the path of a '
        'tokenizer.json.')
    return cls(tokenizers.Tokenizer.from_file(str(path)), eos_id=eos_id,
               **kwargs)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size()

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; special tokens written in it stay whole."""
    if not isinstance(text, str):
      raise TypeError(f'encode takes a str; got {type(text).__name__}: '
                      f'{text!r:.80}.')
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if self.add_bos if add_bos is None else add_bos:
      ids = [self.bos_id, *ids]
    return ids

  def decode(self, ids: Iterable[int], *,
             skip_special_tokens: bool = True) -> str:
    """The text of `ids` (special tokens dropped unless asked for)."""
    return self.backend.decode([int(i) for i in ids],
                               skip_special_tokens=skip_special_tokens)

  def chat_prompt(self, messages: str | Sequence[Message], *,
                  add_generation_prompt: bool = True) -> str:
    """The ChatML text of a conversation, ready for the assistant's turn.

    Args:
      messages: a user message, or `{'role': ..., 'content': ...}` dicts.
      add_generation_prompt: end with an open assistant turn.

    Example:
      >>> alphabet = pre_tokenizers.ByteLevel.alphabet()
      >>> tok = Tokenizer.from_bpe(
      ...     tokens=['<|im_start|>', '<|im_end|>'] + sorted(alphabet),
      ...     merges=[], special_ids=[0, 1], eos_id=1)
      >>> print(tok.chat_prompt('Hi'))
      <|im_start|>user
      Hi<|im_end|>
      <|im_start|>assistant
      <BLANKLINE>
    """
    if self.token_to_id(_IM_START) is None:
      raise ValueError(
        f'chat_prompt writes ChatML, but this tokenizer has no {_IM_START!r} '
        'token. Format the prompt yourself and call encode.')
    if isinstance(messages, str):
      messages = [{'role': 'user', 'content': messages}]
    messages = list(messages)
    for message in messages:
      if not isinstance(message, Mapping) or set(message) != {'role',
                                                              'content'}:
        raise ValueError(
          f"chat_prompt messages must be {{'role', 'content'}} dicts; got "
          f'{message!r}.')
    if (self.default_system_prompt is not None
        and (not messages or messages[0]['role'] != 'system')):
      messages.insert(0, {'role': 'system',
                          'content': self.default_system_prompt})
    text = ''.join(f'{_IM_START}{m["role"]}\n{m["content"]}{_IM_END}\n'
                   for m in messages)
    if add_generation_prompt:
      text += f'{_IM_START}assistant\n'
    return text

  def chat_template(self) -> str | None:
    """The HF Jinja template of `chat_prompt`; None without ChatML tokens."""
    if self.token_to_id(_IM_START) is None:
      return None
    return chatml_template(self.default_system_prompt)

  def encode_chat(self, messages: str | Sequence[Message]) -> list[int]:
    """`encode(chat_prompt(messages))`."""
    return self.encode(self.chat_prompt(messages))
