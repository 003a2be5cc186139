"""`forcekit run` (what `make run` does): the main job on the shipped default model.

With a trained default model under ``models/default`` it serves it to the browser (`forcekit
serve` prints the URL to open once it listens). Without one, it generates a short video with an
untrained random tiny bundle and says so: the runtime works end to end, the pictures are noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "default"


def register(commands) -> None:
    p = commands.add("run", func=run, help="the main job: serve the shipped default model (or, until one ships, "
                                           "generate with a random tiny bundle)")
    p.add_argument("--bundle", default=None, help="bundle to serve (default: models/default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="TCP port of the page")


def _delegate(argv: list[str]) -> int:
    """Run another subcommand in this process; its errors are reported as this command's."""
    from forcekit.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def run(args: argparse.Namespace) -> int:
    bundle = args.bundle or (str(DEFAULT_BUNDLE) if (DEFAULT_BUNDLE / "config.json").is_file() else None)
    if bundle is None:
        print("No trained default model ships yet (models/default is missing): generating 64 frames with an "
              "untrained random tiny bundle, so the output is noise. To see the browser front end anyway: "
              "forcekit serve --bundle random-tiny")
        return _delegate(["generate", "--bundle", "random-tiny", "--frames", "64", "--out", "out/run.mp4",
                          "--threads", "1"])
    print(f"forcekit run: serving {bundle} (Ctrl-C to stop)", flush=True)
    return _delegate(["serve", f"--bundle={bundle}", f"--host={args.host}", f"--port={args.port}"])
