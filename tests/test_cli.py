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
  for cmd in ("train", "train lm", "bench", "bench train", "bench attention"):
    assert cmd in names, names


@pytest.mark.parametrize("cmd", ALL, ids=lambda c: " ".join(c) or "jaxlab")
def test_help(cmd, capsys):
  with pytest.raises(SystemExit) as e:
    build_parser().parse_args([*cmd, "--help"])
  assert e.value.code == 0
  assert "usage:" in capsys.readouterr().out
