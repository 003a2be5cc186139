import subprocess
import sys

from forcekit.cli import build_parser


def _all_parsers(parser, prefix=()):
    yield prefix, parser
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    seen = 0
    for path, sub in _all_parsers(parser):
        text = sub.format_help()
        assert "usage:" in text, path
        seen += 1
    assert seen >= 1


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "forcekit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "forcekit" in out.stdout
