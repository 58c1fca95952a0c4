"""The user's data (`peft.models.load_examples`): each row form's targets,
checked by decoding exactly the tokens the loss covers; every bad row named
by file and line."""

import json
import pathlib

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from peft import models

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())


def chatml():
  return models.Tokenizer.from_bpe(
      tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>', *ALPHABET],
      merges=[], special_ids=[0, 1, 2], eos_id=0)


def gemma():
  return models.Tokenizer.from_bpe(
      tokens=['<eos>', '<bos>', '<start_of_turn>', '<end_of_turn>',
              *ALPHABET],
      merges=[], special_ids=[0, 1, 2, 3], eos_id=0, bos_id=1,
      add_bos=True)


def plain():
  return models.Tokenizer.from_bpe(tokens=['<|endoftext|>', *ALPHABET],
                                   merges=[], special_ids=[0], eos_id=0)


def _write(tmp_path: pathlib.Path, rows, name='data.jsonl') -> pathlib.Path:
  path = tmp_path / name
  path.write_text(''.join(
      (r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))
  return path


def _targets(tok, tokens, weights) -> str:
  """The text of exactly the tokens the loss covers."""
  picked = [int(t) for t, w in zip(tokens[1:], weights) if w]
  return tok.decode(picked, skip_special_tokens=False)


CHAT = {'messages': [
    {'role': 'system', 'content': 'Be brief.'},
    {'role': 'user', 'content': 'Who?'},
    {'role': 'assistant', 'content': 'Hamlet'},
    {'role': 'user', 'content': 'Play?'},
    {'role': 'assistant', 'content': 'Hamlet, Prince'},
]}


def test_chatml_targets_are_the_assistant_turns_and_their_ends(tmp_path):
  tok = chatml()
  ex = models.load_examples([_write(tmp_path, [CHAT])], tok, length=200)
  assert _targets(tok, ex.tokens[0], ex.weights[0]) == (
      'Hamlet<|im_end|>\nHamlet, Prince<|im_end|>\n')
  # The whole row is the template's rendering, then pads that are no target.
  text = tok.chat_prompt(CHAT['messages'], add_generation_prompt=False)
  n = len(tok.encode(text))
  assert tok.decode(ex.tokens[0][:n].tolist(),
                    skip_special_tokens=False) == text
  assert not ex.weights[0][n - 1:].any()
  assert ex.sources == (f'{tmp_path / "data.jsonl"}:1',)


def test_gemma_targets_are_the_model_turns(tmp_path):
  tok = gemma()
  ex = models.load_examples([_write(tmp_path, [CHAT])], tok, length=200)
  assert _targets(tok, ex.tokens[0], ex.weights[0]) == (
      'Hamlet<end_of_turn>\nHamlet, Prince<end_of_turn>\n')
  assert ex.tokens[0][0] == tok.bos_id and (ex.tokens[0] == tok.bos_id
                                            ).sum() == 1


def test_prompt_completion_and_text_rows(tmp_path):
  tok = plain()
  path = _write(tmp_path, [{'prompt': 'To be', 'completion': ' or not'},
                           '', {'text': 'All the world'}])
  ex = models.load_examples([path], tok, length=32)
  assert _targets(tok, ex.tokens[0], ex.weights[0]) == ' or not<|endoftext|>'
  # A text row is all target (its first token has no context to predict it).
  assert _targets(tok, ex.tokens[1], ex.weights[1]) == (
      'll the world<|endoftext|>')
  assert ex.sources[1].endswith('data.jsonl:3')  # the blank line is skipped
  assert ex.target_tokens == len(' or not') + 1 + len('ll the world') + 1


def test_a_text_file_is_cut_into_full_windows(tmp_path):
  tok = plain()
  path = tmp_path / 'notes.txt'
  path.write_text('abcdefghij' * 3)
  ex = models.load_examples([path], tok, length=8)
  assert ex.tokens.shape == (3, 8) and ex.weights.all()
  assert tok.decode(ex.tokens[0].tolist()) == 'abcdefgh'


BAD_ROWS = [
    ('{"text": "a"', r'data\.jsonl:1: not JSON'),
    ('[1, 2]', r'data\.jsonl:1: a row must be a JSON object; got list'),
    ({'text': 'a', 'prompt': 'b', 'completion': 'c'},
     r'needs exactly one of "text", "prompt"'),
    ({'input': 'a'}, r'needs exactly one of .*got keys \[\'input\'\]'),
    ({'prompt': 'a'}, r"a 'prompt' row has keys \['prompt', 'completion'\]"
     r".*missing \['completion'\]"),
    ({'text': 'a', 'label': 1}, r"unknown \['label'\]"),
    ({'text': 3}, r'text must be a string; got int 3'),
    ({'text': '  '}, r'text is empty'),
    ({'messages': []}, r'"messages" must be a non-empty list'),
    ({'messages': [{'role': 'bot', 'content': 'x'}]},
     r"data\.jsonl:1 messages\[0\]: unknown role 'bot'"),
    ({'messages': [{'role': 'user', 'content': ''}]},
     r'messages\[0\]: content is empty'),
    ({'messages': [{'role': 'user'}]}, r'a message is \{"role"'),
    ({'messages': [{'role': 'user', 'content': 'x'}]},
     r'no assistant message, so nothing in it is a target'),
    ({'text': 'x' * 40}, r'the example is 41 tokens; an example holds at '
     r'most 16 \(--seq-len \+ 1\)'),
]


@pytest.mark.parametrize('row, match', BAD_ROWS)
def test_a_bad_row_is_an_error_naming_the_file_and_line(tmp_path, row, match):
  path = _write(tmp_path, [row])
  with pytest.raises(models.DataError, match=match):
    models.load_examples([path], chatml(), length=16)


def test_bad_rows_are_skipped_and_counted_under_the_flag(tmp_path):
  rows = [{'text': 'good'}] + [row for row, _ in BAD_ROWS]
  path = _write(tmp_path, rows)
  ex = models.load_examples([path], chatml(), length=16, skip_bad_rows=True)
  assert (len(ex), ex.skipped) == (1, len(BAD_ROWS))
  with pytest.raises(models.DataError, match=r'no example to train on \(1 '
                     r'bad rows skipped\)'):
    models.load_examples([_write(tmp_path, ['nope'], 'b.jsonl')], chatml(),
                         length=16, skip_bad_rows=True)


def test_template_errors_and_file_errors_name_the_place(tmp_path):
  path = _write(tmp_path, [{'messages': [
      {'role': 'assistant', 'content': 'x'}]}])
  with pytest.raises(models.DataError, match=r'data\.jsonl:1: Gemma chat '
                     r'turns must alternate'):
    models.load_examples([path], gemma(), length=64)
  with pytest.raises(models.DataError, match=r'needs a chat model.*"prompt"/'
                     r'"completion" rows'):
    models.load_examples([_write(tmp_path, [CHAT])], plain(), length=64)
  with pytest.raises(models.DataError, match=r"data files are \.jsonl or "
                     r"\.txt; got '\.csv'"):
    models.load_examples([_write(tmp_path, [CHAT], 'x.csv')], plain(),
                         length=64)
  with pytest.raises(FileNotFoundError, match=r"no data file at '.*nope'"):
    models.load_examples([tmp_path / 'nope'], plain(), length=64)


def test_a_split_is_seeded_disjoint_and_complete(tmp_path):
  rows = [{'text': f'row {i}'} for i in range(20)]
  ex = models.load_examples([_write(tmp_path, rows)], plain(), length=16)
  train, held = ex.split(0.25, seed=3)
  again, _ = ex.split(0.25, seed=3)
  assert (len(train), len(held)) == (15, 5)
  assert set(train.sources) | set(held.sources) == set(ex.sources)
  assert not set(train.sources) & set(held.sources)
  np.testing.assert_array_equal(train.tokens, again.tokens)
  with pytest.raises(ValueError, match='leaves no training example'):
    ex.take(slice(0, 1)).split(0.5)


def test_the_shipped_example_file_is_what_its_script_writes():
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parent.parent / 'examples' / 'data'
  spec = importlib.util.spec_from_file_location(
      'make_which_play', root / 'make_which_play.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  rows = [json.loads(line) for line in
          (root / 'which_play.jsonl').read_text().splitlines()]
  assert rows == list(module.rows())
  assert len({r['messages'][1]['content'] for r in rows}) == 8
  examples = models.load_examples([root / 'which_play.jsonl'], chatml(),
                                  length=512)
  assert len(examples) == len(rows) == 128
