"""Writes `which_play.jsonl`: "Which play is this line from?" chat rows.

Built from the Shakespeare plays `peft.models` ships: for each of eight
plays, the first line of its first 16 speeches of four lines or more,
asked as a user turn, with the play's title as the assistant's answer.
Run from the repository root:

  .venv/bin/python examples/data/make_which_play.py
"""

import json
import pathlib

from peft import models

PLAYS = ('hamlet', 'macbeth', 'romeo-and-juliet', 'the-tempest', 'othello',
         'king-lear', 'julius-caesar', 'twelfth-night')
PER_PLAY = 16


def rows():
  plays = {p.slug: p for p in models.load_plays()}
  for slug in PLAYS:
    play = plays[slug]
    lines = [s.text.splitlines()[0] for s in play.speeches
             if len(s.text.splitlines()) >= 4]
    for line in lines[:PER_PLAY]:
      yield {'messages': [
          {'role': 'user', 'content': f'Which play is this line from? {line}'},
          {'role': 'assistant', 'content': play.title}]}


if __name__ == '__main__':
  out = pathlib.Path(__file__).with_name('which_play.jsonl')
  out.write_text(''.join(json.dumps(r) + '\n' for r in rows()))
  print(f'wrote {out}')
