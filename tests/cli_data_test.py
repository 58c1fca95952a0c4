"""`python -m peft finetune/eval --data`: the user's JSONL rows on the tiny
model, the loss over their targets only, checked against an independent
masked perplexity; bad rows named by file and line."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft import models
from peft._cli import adapt
from peft._cli import base as base_lib
from tests.cli_test import run_cli

SEQ = ('--seq-len', '80')
PLAYS = [('To be, or not to be', 'Hamlet'), ('Out, damned spot', 'Macbeth'),
         ('A horse! a horse!', 'Richard'), ('Et tu, Brute?', 'Caesar')]


def _chat_rows(n=20):
  return [{'messages': [
      {'role': 'user', 'content': f'Who says: {line}?'},
      {'role': 'assistant', 'content': who}]}
          for line, who in (PLAYS * n)[:n]]


@pytest.fixture(scope='module')
def chat_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('data') / 'lines.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in _chat_rows()))
  return path


@pytest.fixture(scope='module')
def trained(tmp_path_factory, chat_file):
  workdir = tmp_path_factory.mktemp('cli_data')
  status, out, err = run_cli('finetune', '--tiny', '--workdir', workdir,
                             '--data', chat_file, *SEQ, '--steps', '4',
                             '--batch-size', '2', '--eval-every', '0')
  assert status == 0, err
  return workdir, out


def _held(chat_file):
  base = base_lib.load_base(base_lib.TINY)
  examples = models.load_examples([chat_file], base.tokenizer, length=81)
  return base, examples.split(0.1, seed=0)


def test_finetune_prints_the_counts_and_records_the_data(trained, chat_file):
  workdir, out = trained
  _, (train, held) = _held(chat_file)
  assert (f'data: {len(train)} training examples ({train.target_tokens} '
          f'target tokens), {len(held)} held out ({held.target_tokens})'
          ) in out
  meta = peft.load_adapters(workdir / 'adapters.safetensors').metadata
  assert meta['peft_cli']['training']['data'] == [str(chat_file)]


def _masked_perplexity(logits, held):
  """exp of the mean NLL over the held-out targets, in numpy float64."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, held.tokens[:, 1:, None], -1)[..., 0]
  return math.exp(-(picked * held.weights).sum() / held.weights.sum())


def test_eval_on_data_is_the_perplexity_of_the_targets_alone(trained,
                                                             chat_file):
  workdir, _ = trained
  status, out, err = run_cli('eval', '--tiny', '--workdir', workdir,
                             '--data', chat_file, *SEQ, '--adapters',
                             workdir / 'adapters.safetensors', '--compare')
  assert status == 0, err
  got = {m[1]: float(m[2]) for m in re.finditer(
      r'^(.+): held-out perplexity ([\d.]+)', out, re.M)}
  base, (_, held) = _held(chat_file)
  model = models.Decoder(config=base.config)
  logits = jax.jit(lambda p, t: model.apply({'params': p}, t))(
      base.params, jnp.asarray(held.tokens[:, :-1]))
  np.testing.assert_allclose(got['base'], _masked_perplexity(logits, held),
                             rtol=1e-4)
  # The whole rows' perplexity differs: the mask is what is measured.
  assert not math.isclose(got['base'], adapt.perplexity(
      base.config, None, base.params, held.tokens), rel_tol=1e-3)
  assert f'({len(held)} held-out examples, {held.target_tokens} target ' \
      'tokens)' in out


def test_eval_data_alone_evaluates_those_files(chat_file):
  status, out, err = run_cli('eval', '--tiny', '--eval-data', chat_file,
                             *SEQ)
  assert status == 0, err
  assert '(20 held-out examples' in out


def test_mean_nll_weights_select_the_targets():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  targets = jnp.array([[1, 2, 3], [4, 0, 1]])
  weights = jnp.array([[0., 1., 1.], [1., 0., 0.]])
  logp = jax.nn.log_softmax(logits)
  want = -(logp[0, 1, 2] + logp[0, 2, 3] + logp[1, 0, 4]) / 3
  np.testing.assert_allclose(adapt.mean_nll(logits, targets, weights), want,
                             rtol=1e-6)


def test_a_bad_row_stops_the_run_naming_its_line(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text(json.dumps(_chat_rows(1)[0]) + '\n{"messages": [\n')
  status, _, err = run_cli('finetune', '--tiny', '--workdir', tmp_path,
                           '--data', path, *SEQ, '--steps', '1')
  assert status == 1
  assert re.search(r'd\.jsonl:2: not JSON', err), err
  assert not (tmp_path / 'adapters.safetensors').exists()


def test_skip_bad_rows_counts_them(tmp_path, chat_file):
  path = tmp_path / 'd.jsonl'
  path.write_text(chat_file.read_text() + '{"text": ""}\nnot json\n')
  status, out, err = run_cli('finetune', '--tiny', '--workdir', tmp_path,
                             '--data', path, *SEQ, '--steps', '1',
                             '--batch-size', '2', '--skip-bad-rows',
                             '--eval-every', '0')
  assert status == 0, err
  assert '; 2 bad rows skipped' in out


@pytest.mark.parametrize('argv, match', [
    (('--eval-data', 'x.jsonl'), r'--eval-data needs --data'),
    (('--data', 'missing.jsonl'), r"no data file at 'missing\.jsonl'"),
])
def test_data_flag_errors(tmp_path, argv, match):
  status, _, err = run_cli('finetune', '--tiny', '--workdir', tmp_path, *argv,
                           *SEQ, '--steps', '1')
  assert status == 1 and re.search(match, err), err


def test_a_val_fraction_of_one_is_refused_by_the_parser(tmp_path, chat_file):
  status, _, err = run_cli('finetune', '--tiny', '--data', chat_file,
                           '--val-fraction', '1')
  assert status == 2
  assert "expected a number in (0, 1); got '1'" in err


def test_exact_match_counts_the_greedy_answers_equal_to_the_reference(
    trained, chat_file):
  workdir, _ = trained
  status, out, err = run_cli('eval', '--tiny', '--data', chat_file, *SEQ,
                             '--adapters', workdir / 'adapters.safetensors',
                             '--exact-match')
  assert status == 0, err
  got = re.search(r'fine-tuned: exact match (\d+)/(\d+)', out)
  # By hand: greedy replies of the adapted tiny model to the held-out rows.
  base, (_, held) = _held(chat_file)
  lora = peft.load_adapters(workdir / 'adapters.safetensors').lora
  params = peft.merge_params(base.params, lora)
  sampler = models.Sampler(model=base.model, tokenizer=base.tokenizer)
  prompts = [r['messages'][:-1] for r in held.rows]
  with peft.lora(8, targets=('.*attn/.*', '.*mlp'), alpha=16.0):
    replies = sampler.generate_text(params, prompts, chat=True,
                                    max_new_tokens=12)
  want = sum(reply.strip() == r['messages'][-1]['content']
             for reply, r in zip(replies, held.rows))
  assert (int(got[1]), int(got[2])) == (want, len(held))


def test_exact_match_without_answers_is_an_error(tmp_path):
  path = tmp_path / 't.jsonl'
  path.write_text(''.join(json.dumps({'text': f'line {i}'}) + '\n'
                          for i in range(20)))
  status, _, err = run_cli('eval', '--tiny', '--data', path, *SEQ,
                           '--exact-match')
  assert status == 1 and 'the held-out data has no chat rows ending' in err


def test_sample_on_data_answers_each_held_out_prompt(trained, chat_file):
  workdir, _ = trained
  status, out, err = run_cli('sample', '--tiny', '--data', chat_file, *SEQ,
                             '--adapters', workdir / 'adapters.safetensors',
                             '--max-new-tokens', '6')
  assert status == 0, err
  _, (_, held) = _held(chat_file)
  references = re.findall(r'\(reference: (.*)\)', out)
  assert references == [r['messages'][-1]['content'] for r in held.rows]
  status, _, err = run_cli('sample', '--tiny', '--data', chat_file,
                           '--prompt', 'Hi')
  assert status == 1 and '--prompt and --data both give' in err
