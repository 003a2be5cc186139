import argparse
import subprocess
import sys

from forcekit.cli import build_parser


def _parsers(parser, prefix=()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, prefix + (name,))


def test_every_option_of_every_command_has_help_and_shows_its_default():
    seen = 0
    for path, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = " ".join(path) + " " + "/".join(action.option_strings or [action.dest])
            assert action.help and len(action.help) > 3, f"{name}: no help text"
            seen += 1
            if action.option_strings and action.nargs != 0 and action.default is not None and not action.required:
                expanded = parser._get_formatter()._expand_help(action)
                assert "default" in expanded.lower(), f"{name}: help does not show the default"
                assert " ".join(expanded.split()) in text, name
    assert seen > 200


def test_generate_and_play_and_serve_share_the_default_bundle():
    defaults = {}
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if "--bundle" in action.option_strings and path in {("generate",), ("play",), ("serve",),
                                                                ("bench", "runtime"), ("bench", "latency")}:
                defaults[path] = action.default
    assert len(defaults) == 5 and set(defaults.values()) == {"auto"}, defaults


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "forcekit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "forcekit" in out.stdout


def test_generate_writes_a_video(tmp_path):
    import json

    import numpy as np

    from forcekit.cli import main
    from runtime.video import read_video

    actions = tmp_path / "actions.json"
    actions.write_text(json.dumps([["forward"], ["left", "attack"], None]))
    out = tmp_path / "v.mp4"
    assert main(["generate", "--bundle", "random-tiny", "--frames", "6", "--steps", "1", "--actions",
                 str(actions), "--out", str(out), "--seed", "3"]) == 0
    video = read_video(out)
    assert video.shape[0] == 6 and video.dtype == np.uint8 and video.std() > 0


def test_generate_rejects_a_bad_actions_file(tmp_path, capsys):
    import json

    from forcekit.cli import main

    actions = tmp_path / "actions.json"
    actions.write_text(json.dumps([["jump"]]))
    assert main(["generate", "--bundle", "random-tiny", "--frames", "2", "--actions", str(actions),
                 "--out", str(tmp_path / "v.mp4")]) == 1
    assert "entry 0: unknown action key 'jump'" in capsys.readouterr().err


def test_bench_runtime_prints_json(capsys):
    import json

    from forcekit.cli import main

    assert main(["bench", "runtime", "--bundle", "random-tiny", "--frames", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("fps", "first_frame_ms", "chunk_ms_p50", "chunk_ms_p95", "kv_cache_bytes", "kv_cache_speedup"):
        assert result[key] > 0, key
    assert result["guidance"] == 1.0


def test_bench_runtime_reports_the_guidance_it_ran(capsys):
    import json

    from forcekit.cli import main

    assert main(["bench", "runtime", "--bundle", "random-tiny", "--frames", "4", "--guidance", "2.5", "--json",
                 "--no-uncached"]) == 0
    assert json.loads(capsys.readouterr().out)["guidance"] == 2.5
