"""The command line explains itself: every option has help text, every command ends with an example."""

from __future__ import annotations

import argparse

from gastro_dist.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_option_has_help_and_every_command_an_example():
    for path, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"gastro-dist {' '.join(path)} {action.option_strings or action.dest} has no help"
        if len(path) == 1:
            assert "example: gastro-dist " in parser.format_help(), f"gastro-dist {path[0]} --help shows no example"


def test_train_help_points_to_config_show():
    train = dict(_commands(build_parser()))[("train",)]
    assert "gastro-dist config show" in train.format_help()
