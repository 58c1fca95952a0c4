"""Tokenizers: byte-level BPE (Radford et al. 2019; Sennrich et al. 2016).

`Tokenizer` wraps a `tokenizers.Tokenizer`: a byte-level BPE built from a
vocabulary and merge list, as a GGUF file stores them (`Tokenizer.from_bpe`),
one read from a `tokenizer.json`, or a SentencePiece BPE
(`peft.models._sentencepiece`); nothing is fetched from a hub. The chat
format follows the vocabulary: `chat_prompt` writes the ChatML turns that
SmolLM2 and many other instruction-tuned models were trained on when the
vocabulary has `<|im_start|>`, and Gemma's turns when it has
`<start_of_turn>`.
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
_START_OF_TURN, _END_OF_TURN = '<start_of_turn>', '<end_of_turn>'
# The default system prompt `gemma_template` writes into its else branch.
_GEMMA_SYSTEM_IN_TEMPLATE = re.compile(
  r"set first_user_prefix = '((?:[^'\\]|\\.)*)' \+ '\\n\\n'", re.DOTALL)

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
  """The system turn a chat template inserts by default, if any.

  Reads ChatML templates and those `gemma_template` writes.

  Example:
    >>> system_prompt_from_template(
    ...     "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}")
    'Be brief.'
    >>> system_prompt_from_template(gemma_template('Be brief.'))
    'Be brief.'
  """
  if not template:
    return None
  match = (_SYSTEM_IN_TEMPLATE.search(template)
           or _GEMMA_SYSTEM_IN_TEMPLATE.search(template))
  # Undo the escapes the templates write inside the Jinja string.
  return re.sub(r"\\([\\'])", r'\1', match.group(1)) if match else None


def _jinja_quote(text: str) -> str:
  return text.replace('\\', '\\\\').replace("'", "\\'")


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
    quoted = _jinja_quote(default_system_prompt)
    system = ("{% if loop.first and messages[0]['role'] != 'system' %}"
              f"{{{{ '{_IM_START}system\n{quoted}{_IM_END}\n' }}}}"
              '{% endif %}')
  return ('{% for message in messages %}' + system
          + f"{{{{ '{_IM_START}' + message['role'] + '\n' + "
          f"message['content'] + '{_IM_END}' + '\n' }}}}"
          '{% endfor %}{% if add_generation_prompt %}'
          f"{{{{ '{_IM_START}assistant\n' }}}}{{% endif %}}")


def gemma_template(default_system_prompt: str | None = None,
                   bos_token: str | None = '<bos>') -> str:
  """A Jinja chat template (HF `tokenizer_config.json`) for Gemma's turns.

  Rendered by Hugging Face's `apply_chat_template`, it writes the text of
  Gemma 3's official template (and of `Tokenizer.chat_prompt`): `bos_token`,
  then `<start_of_turn>{role}\\n{content}<end_of_turn>\\n` per message with
  'assistant' written 'model' and the content stripped, a system message
  (or else `default_system_prompt`) folded into the first user turn as
  `system + '\\n\\n' + user`, and `<start_of_turn>model\\n` to prompt a
  reply. Roles must alternate user/assistant after the system message.

  Example:
    >>> import jinja2
    >>> print(jinja2.Template(gemma_template()).render(
    ...     messages=[{'role': 'system', 'content': 'Be brief.'},
    ...               {'role': 'user', 'content': ' Hi '}],
    ...     add_generation_prompt=True))
    <bos><start_of_turn>user
    Be brief.
    <BLANKLINE>
    Hi<end_of_turn>
    <start_of_turn>model
    <BLANKLINE>
  """
  default = ("''" if default_system_prompt is None
             else f"'{_jinja_quote(default_system_prompt)}' + '\\n\\n'")
  return (
    (f"{{{{ '{_jinja_quote(bos_token)}' }}}}" if bos_token else '')
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    '{%- else -%}'
    f'{{%- set first_user_prefix = {default} -%}}'
    '{%- set loop_messages = messages -%}'
    '{%- endif -%}'
    '{%- for message in loop_messages -%}'
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    '{%- endif -%}'
    f"{{{{ '{_START_OF_TURN}' + ('model' if message['role'] == 'assistant' "
    "else message['role']) + '\\n' + (first_user_prefix if loop.first "
    f"else '') + (message['content'] | trim) + '{_END_OF_TURN}\\n' }}}}"
    '{%- endfor -%}'
    f"{{%- if add_generation_prompt -%}}{{{{ '{_START_OF_TURN}model\\n' }}}}"
    '{%- endif -%}')


class Tokenizer:
  """Text <-> token ids, with special tokens kept whole.

  The chat format (`chat_format`, `chat_prompt`, `chat_template`) follows
  the vocabulary: ChatML with `<|im_start|>`, Gemma with `<start_of_turn>`;
  `stop_ids` are the ids that end a generated reply.

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
      if self.bos_id is None:
        raise ValueError(
          'Tokenizer.encode add_bos=True needs a bos_id; this tokenizer has '
          'None. Pass add_bos=False, or build the tokenizer with a bos_id.')
      ids = [self.bos_id, *ids]
    return ids

  def decode(self, ids: Iterable[int], *,
             skip_special_tokens: bool = True) -> str:
    """The text of `ids` (special tokens dropped unless asked for)."""
    return self.backend.decode([int(i) for i in ids],
                               skip_special_tokens=skip_special_tokens)

  @property
  def chat_format(self) -> str | None:
    """The chat format of the vocabulary: 'chatml', 'gemma' or None.

    ChatML when it has `<|im_start|>`, else Gemma's when it has
    `<start_of_turn>`.
    """
    if self.token_to_id(_IM_START) is not None:
      return 'chatml'
    if self.token_to_id(_START_OF_TURN) is not None:
      return 'gemma'
    return None

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end generation: `eos_id`, then the end of a chat turn.

    The end of a turn is `<|im_end|>` (ChatML) or `<end_of_turn>` (Gemma),
    when the vocabulary has it and it is not `eos_id` already.
    """
    ids = [self.eos_id]
    ends: dict[str | None, str] = {'chatml': _IM_END, 'gemma': _END_OF_TURN}
    end = ends.get(self.chat_format)
    end_id = None if end is None else self.token_to_id(end)
    if end_id is not None and end_id != self.eos_id:
      ids.append(end_id)
    return tuple(ids)

  def chat_prompt(self, messages: str | Sequence[Message], *,
                  add_generation_prompt: bool = True) -> str:
    """The text of a conversation in the vocabulary's chat format.

    ChatML (`chat_format == 'chatml'`) writes
    `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, after the
    default system turn when the conversation has none. Gemma writes
    `<bos><start_of_turn>{role}\\n{content}<end_of_turn>\\n` per message,
    as Gemma 3's official template does: 'assistant' becomes 'model', the
    content is stripped, and the system message (or the default one) is
    folded into the first user turn as `system + '\\n\\n' + user`.

    Args:
      messages: a user message, or `{'role': ..., 'content': ...}` dicts.
      add_generation_prompt: end with an open assistant turn.

    Raises:
      ValueError: a vocabulary with no chat format, a message that is not a
        `{'role', 'content'}` dict of strings, or (Gemma) roles that do not
        alternate user/assistant.

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
      >>> gemma = Tokenizer.from_bpe(
      ...     tokens=['<bos>', '<start_of_turn>', '<end_of_turn>']
      ...     + sorted(alphabet), merges=[], special_ids=[0, 1, 2], eos_id=2,
      ...     bos_id=0)
      >>> print(gemma.chat_prompt([{'role': 'user', 'content': 'Hi'},
      ...                          {'role': 'assistant', 'content': 'Yo'}],
      ...                         add_generation_prompt=False))
      <bos><start_of_turn>user
      Hi<end_of_turn>
      <start_of_turn>model
      Yo<end_of_turn>
      <BLANKLINE>
    """
    chat_format = self.chat_format
    if chat_format is None:
      raise ValueError(
        f'chat_prompt writes ChatML or Gemma turns, but this tokenizer has '
        f'no {_IM_START!r} token (ChatML) nor {_START_OF_TURN!r} (Gemma). '
        'Format the prompt yourself and call encode.')
    if isinstance(messages, str):
      messages = [{'role': 'user', 'content': messages}]
    messages = list(messages)
    for i, message in enumerate(messages):
      if not isinstance(message, Mapping) or set(message) != {'role',
                                                              'content'}:
        raise ValueError(
          f"chat_prompt messages must be {{'role', 'content'}} dicts; got "
          f'{message!r} at messages[{i}].')
      bad = [k for k in ('role', 'content') if not isinstance(message[k], str)]
      if bad:
        raise ValueError(
          f'chat_prompt message {bad[0]} must be a str; got '
          f'{type(message[bad[0]]).__name__} {message[bad[0]]!r:.60} at '
          f'messages[{i}]. Pass text (images are not supported).')
    if chat_format == 'gemma':
      return self._gemma_prompt(messages, add_generation_prompt)
    if (self.default_system_prompt is not None
        and (not messages or messages[0]['role'] != 'system')):
      messages.insert(0, {'role': 'system',
                          'content': self.default_system_prompt})
    text = ''.join(f'{_IM_START}{m["role"]}\n{m["content"]}{_IM_END}\n'
                   for m in messages)
    if add_generation_prompt:
      text += f'{_IM_START}assistant\n'
    return text

  def _bos_text(self) -> str:
    if self.bos_id is None:
      return ''
    # None only for an id outside the vocabulary, which __init__ refuses.
    return self.backend.id_to_token(self.bos_id) or ''

  def _gemma_prompt(self, messages: list[Message],
                    add_generation_prompt: bool) -> str:
    first = 0
    prefix = ''
    if messages and messages[0]['role'] == 'system':
      if len(messages) == 1:
        raise ValueError(
          f'a Gemma chat folds the system message into the first user turn, '
          f'but none follows it: got only {messages[0]!r}. Add the user '
          'message after it.')
      prefix = messages[0]['content'] + '\n\n'
      first = 1
    elif self.default_system_prompt is not None:
      prefix = self.default_system_prompt + '\n\n'
    parts = [self._bos_text()]
    for turn, message in enumerate(messages[first:]):
      role = message['role']
      if (role == 'user') != (turn % 2 == 0):
        raise ValueError(
          f'Gemma chat turns must alternate user/assistant/user/... after '
          f'an optional system message; got role {role!r} at '
          f'messages[{first + turn}]. Merge consecutive turns of one role.')
      parts.append(
        f'{_START_OF_TURN}{"model" if role == "assistant" else role}\n'
        f'{prefix if turn == 0 else ""}{message["content"].strip()}'
        f'{_END_OF_TURN}\n')
    if add_generation_prompt:
      parts.append(f'{_START_OF_TURN}model\n')
    return ''.join(parts)

  def chat_template(self) -> str | None:
    """The HF Jinja template of `chat_prompt`; None without a chat format.

    Example:
      >>> alphabet = pre_tokenizers.ByteLevel.alphabet()
      >>> gemma = Tokenizer.from_bpe(
      ...     tokens=['<bos>', '<start_of_turn>', '<end_of_turn>']
      ...     + sorted(alphabet), merges=[], special_ids=[0, 1, 2], eos_id=2,
      ...     bos_id=0)
      >>> gemma.chat_template() == gemma_template(bos_token='<bos>')
      True
    """
    if self.chat_format == 'chatml':
      return chatml_template(self.default_system_prompt)
    if self.chat_format == 'gemma':
      return gemma_template(self.default_system_prompt,
                            bos_token=self._bos_text() or None)
    return None

  def encode_chat(self, messages: str | Sequence[Message], *,
                  add_generation_prompt: bool = True) -> list[int]:
    """`encode(chat_prompt(messages, ...))`, without a second BOS.

    When the prompt starts with the BOS token (Gemma's does), `add_bos` is
    not applied again.
    """
    text = self.chat_prompt(messages,
                            add_generation_prompt=add_generation_prompt)
    bos = self._bos_text()
    return self.encode(text, add_bos=False if bos and text.startswith(bos)
                       else None)
