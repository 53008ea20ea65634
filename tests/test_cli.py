"""Every `jaxlab` command and subcommand answers --help."""

import argparse

import pytest

from jaxlab.cli import build_parser


def _commands(parser, prefix=()):
  yield prefix
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sub in action.choices.items():
        yield from _commands(sub, prefix + (name,))


ALL = list(_commands(build_parser()))


def test_expected_commands_exist():
  names = {" ".join(c) for c in ALL}
  for cmd in ("train", "train lm", "train rlcr", "generate", "chat", "bench", "bench train",
              "bench attention", "bench optim", "bench decode"):
    assert cmd in names, names


def _parsers(parser):
  yield parser
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for sub in action.choices.values():
        yield from _parsers(sub)
      for choice in action._choices_actions:
        yield choice.help


def test_help_text_is_whole():
  """Every description and subcommand summary is a whole phrase, not a line cut mid-sentence."""
  for p in _parsers(build_parser()):
    text = p if isinstance(p, str) else p.description
    if text:
      assert not text.rstrip().endswith((" and", " or", " the", ",", " in")), text


@pytest.mark.parametrize("cmd", ALL, ids=lambda c: " ".join(c) or "jaxlab")
def test_help(cmd, capsys):
  with pytest.raises(SystemExit) as e:
    build_parser().parse_args([*cmd, "--help"])
  assert e.value.code == 0
  assert "usage:" in capsys.readouterr().out
