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


def test_generate_rejects_a_bad_actions_file(tmp_path):
    import json

    import pytest

    from forcekit.cli import main

    actions = tmp_path / "actions.json"
    actions.write_text(json.dumps([["jump"]]))
    with pytest.raises(SystemExit, match="entry 0: unknown action key 'jump'"):
        main(["generate", "--frames", "2", "--actions", str(actions), "--out", str(tmp_path / "v.mp4")])


def test_bench_runtime_prints_json(capsys):
    import json

    from forcekit.cli import main

    assert main(["bench", "runtime", "--frames", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("fps", "first_frame_ms", "chunk_ms_p50", "chunk_ms_p95", "kv_cache_bytes", "kv_cache_speedup"):
        assert result[key] > 0, key
    assert result["guidance"] == 1.0


def test_bench_runtime_reports_the_guidance_it_ran(capsys):
    import json

    from forcekit.cli import main

    assert main(["bench", "runtime", "--frames", "4", "--guidance", "2.5", "--json", "--no-uncached"]) == 0
    assert json.loads(capsys.readouterr().out)["guidance"] == 2.5
