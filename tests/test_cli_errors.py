"""Hostile input to every `forcekit` command: one line naming the problem, a non-zero exit, no traceback.

Exit status 2 for a bad argument (refused while parsing), 1 for a failure (a missing or corrupt
bundle, data dir, shard, checkpoint, codec or actions file). Each case runs `main()` in-process;
a few run the real entry point in a subprocess.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from forcekit.cli import main
from runtime import Bundle, BundleError, ModelConfig
from training.data.shards import Episode, ShardStore


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit status, the one error line). Fails on anything but one line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert "internal error" not in lines[0], lines[0]
    assert err.rstrip().endswith(lines[0]), f"the error line should come last: {err!r}"
    return code, lines[0]


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, str]:
    """A good tiny bundle and one broken copy per defect (paths by defect name)."""
    root = tmp_path_factory.mktemp("bundles")
    good = Bundle.random(ModelConfig.tiny(), seed=0, name="good").save(root / "good")

    def broken(name: str, edit) -> str:
        path = root / name
        shutil.copytree(good, path)
        edit(path)
        return str(path)

    def edit_config(**changes):
        def edit(path):
            cfg = json.loads((path / "config.json").read_text())
            for key, value in changes.items():
                section, _, field = key.rpartition("__")
                (cfg[section] if section else cfg)[field] = value
            (path / "config.json").write_text(json.dumps(cfg))
        return edit

    def truncate(path):
        data = (path / "weights.safetensors").read_bytes()
        (path / "weights.safetensors").write_bytes(data[: len(data) // 2])

    (root / "empty").mkdir()
    return {
        "good": str(good),
        "missing": str(root / "no-such-bundle"),
        "empty": str(root / "empty"),
        "truncated": broken("truncated", truncate),
        "garbage": broken("garbage", lambda p: (p / "config.json").write_text("}{ not json")),
        "layers": broken("layers", edit_config(model__num_layers="six")),
        "fps": broken("fps", edit_config(fps=-5)),
        "not-a-dict": broken("not-a-dict", lambda p: (p / "config.json").write_text("[1, 2]")),
        "codec": broken("codec", edit_config(codec="pixel")),
        "chunk": broken("chunk", edit_config(model__first_chunk_frames=0)),
    }


# What each broken bundle's error line must name.
BUNDLE_DEFECTS = {"missing": "no-such-bundle", "empty": "config.json", "truncated": "weights.safetensors",
                  "garbage": "config.json", "layers": "num_layers", "fps": "fps", "not-a-dict": "config.json",
                  "codec": "'codec' must be a JSON object", "chunk": "chunk pattern"}


def _write_data(root, shards: int = 2, frames: int = 9) -> ShardStore:
    store = ShardStore(root)
    store.write_meta({"engine": "synthetic", "version": "0", "fps": 10.0, "resolution": [8, 8],
                      "action_space": {"keys": ["a", "b"], "values": [], "bindings": {}}})
    rng = np.random.default_rng(0)
    for s in range(shards):
        store.append([Episode(rng.integers(0, 255, (frames, 8, 8, 3), dtype=np.uint8),
                              (rng.random((frames, 2)) > 0.5).astype(np.float32), seed=s)])
    return store


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """A good data dir and broken ones: missing, empty, garbage meta.json, meta.json without fields,
    a truncated shard."""
    root = tmp_path_factory.mktemp("data")
    _write_data(root / "good")
    (root / "empty").mkdir()
    (root / "garbage").mkdir()
    (root / "garbage" / "meta.json").write_text("not json {")
    (root / "fieldless").mkdir()
    (root / "fieldless" / "meta.json").write_text("{}")
    _write_data(root / "shardless", shards=0)
    corrupt = _write_data(root / "corrupt")
    shard = corrupt.shard_paths()[0]
    shard.write_bytes(shard.read_bytes()[:200])
    return {"good": str(root / "good"), "missing": str(root / "no-such-data"), "empty": str(root / "empty"),
            "garbage": str(root / "garbage"), "fieldless": str(root / "fieldless"),
            "shardless": str(root / "shardless"), "corrupt": str(root / "corrupt"),
            "corrupt_shard": shard.name}


# -- bundles -----------------------------------------------------------------------------------------
BUNDLE_COMMANDS = {
    "generate": ["generate", "--frames", "2"],
    "bench runtime": ["bench", "runtime", "--frames", "2"],
    "bench latency": ["bench", "latency", "--seconds", "0.1"],
    "play": ["play", "--max-frames", "1"],
    "serve": ["serve", "--host", "127.0.0.1", "--port", "{busy_port}"],
    "run": ["run", "--host", "127.0.0.1", "--port", "{busy_port}"],
    "eval world": ["eval", "world", "--env", "doom:basic"],
    "eval controls": ["eval", "controls", "--env", "doom:basic"],
    "eval longplay": ["eval", "longplay", "--frames", "2"],
    "eval gap": ["eval", "gap", "--data", "{tmp}/no-data"],
    "train causal": ["train", "causal", "--out", "{tmp}/run"],
    "train dmd": ["train", "dmd", "--out", "{tmp}/run", "--teacher", "{good}"],
    "ship": ["ship", "--out", "{tmp}/shipped"],
}


@pytest.fixture(scope="module")
def busy_port():
    """A port something already listens on: a server that wrongly got past the bundle fails, not hangs."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("defect", sorted(BUNDLE_DEFECTS))
@pytest.mark.parametrize("command", sorted(BUNDLE_COMMANDS))
def test_a_bad_bundle_is_one_line_naming_it(command, defect, bundles, busy_port, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, good=bundles["good"], busy_port=busy_port) for a in BUNDLE_COMMANDS[command]]
    code, line = _run(capsys, argv + ["--bundle", bundles[defect]])
    assert code == 1
    assert line.startswith(f"forcekit {command}: error:"), line
    assert BUNDLE_DEFECTS[defect] in line, line


def test_a_bad_teacher_bundle_is_named(bundles, data, tmp_path, capsys):
    code, line = _run(capsys, ["train", "dmd", "--bundle", bundles["good"], "--teacher", bundles["truncated"],
                               "--out", str(tmp_path / "run"), "--data", data["good"]])
    assert code == 1 and "truncated/weights.safetensors" in line, line


# -- recorded data, codecs, checkpoints --------------------------------------------------------------
@pytest.mark.parametrize("defect, named", [("missing", "no-such-data"), ("empty", "meta.json"),
                                           ("garbage", "meta.json"), ("fieldless", "resolution"),
                                           ("shardless", "no shards")])
def test_data_check_on_a_bad_dir(defect, named, data, capsys):
    code, line = _run(capsys, ["data", "check", data[defect]])
    assert code == 1 and named in line, line


def test_data_check_names_a_corrupt_shard(data, capsys):
    assert main(["data", "check", data["corrupt"]]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"BAD SHARD {data['corrupt']}/{data['corrupt_shard']}" in err


TEACHER = ["train", "teacher", "--layers", "1", "--heads", "1", "--head-dim", "8", "--ffn", "16",
           "--freq-dim", "8", "--steps", "1", "--batch", "1", "--clip-frames", "3"]


@pytest.mark.parametrize("defect, named", [("missing", "no-such-data"), ("empty", "meta.json"),
                                           ("garbage", "meta.json"), ("fieldless", "resolution"),
                                           ("corrupt", "shard_00000.npz")])
def test_train_teacher_on_bad_data(defect, named, data, tmp_path, capsys):
    code, line = _run(capsys, TEACHER + ["--data", data[defect], "--codec", "pixel", "--out", str(tmp_path)])
    assert code == 1 and named in line, line


def test_train_teacher_refuses_a_field_of_view_without_a_camera_warp(data, tmp_path, capsys):
    code, line = _run(capsys, TEACHER + ["--data", data["good"], "--codec", "pixel", "--out", str(tmp_path),
                                         "--stack-frames", "1", "--camera-fov", "90"])
    assert code == 1 and "camera_fov needs camera_warp" in line, line


@pytest.mark.parametrize("defect, named", [("missing", "no-such-data"), ("garbage", "meta.json"),
                                           ("corrupt", "shard_00000.npz")])
def test_eval_camera_on_bad_data(defect, named, data, capsys):
    code, line = _run(capsys, ["eval", "camera", "--data", data[defect]])
    assert code == 1 and named in line, line


def test_eval_camera_reports_each_key_and_refuses_a_field_of_view_past_180(data, capsys):
    assert main(["eval", "camera", "--data", data["good"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["keys"]) == {"a", "b"} and report["fov"] is None       # too few steady turns to fit
    code, line = _run(capsys, ["eval", "camera", "--data", data["good"], "--fovs", "90,200"])
    assert code == 2 and "--fovs" in line, line


def test_train_codec_on_a_corrupt_shard(data, tmp_path, capsys):
    code, line = _run(capsys, ["train", "codec", "--data", data["corrupt"], "--out", str(tmp_path), "--steps", "1"])
    assert code == 1 and "shard_00000.npz" in line, line


@pytest.fixture(scope="module")
def codecs(tmp_path_factory) -> dict[str, str]:
    """Trained-codec dirs that are broken: garbage codec.json, truncated codec.safetensors."""
    from runtime.autoencoder import ConvAEConfig, ConvAutoencoder
    from training.codec import save_codec

    root = tmp_path_factory.mktemp("codecs")
    good = root / "good"
    save_codec(ConvAutoencoder(ConvAEConfig(latent_channels=2)), good)
    garbage, truncated = root / "garbage", root / "truncated"
    shutil.copytree(good, garbage)
    (garbage / "codec.json").write_text("{{{")
    shutil.copytree(good, truncated)
    weights = (truncated / "codec.safetensors").read_bytes()
    (truncated / "codec.safetensors").write_bytes(weights[:100])
    return {"missing": str(root / "no-such-codec"), "garbage": str(garbage), "truncated": str(truncated),
            "pixel-typo": "pixel:two"}


@pytest.mark.parametrize("defect, named, status", [("missing", "no-such-codec", 1), ("garbage", "codec.json", 1),
                                                   ("truncated", "codec.safetensors", 1),
                                                   ("pixel-typo", "pixel:two", 2)])
def test_train_teacher_with_a_bad_codec(defect, named, status, codecs, data, tmp_path, capsys):
    code, line = _run(capsys, TEACHER + ["--data", data["good"], "--codec", codecs[defect], "--out", str(tmp_path)])
    assert code == status and named in line, line


def test_eval_codec_with_a_bad_codec(codecs, data, capsys):
    code, line = _run(capsys, ["eval", "codec", "--codec", codecs["truncated"], "--data", data["good"]])
    assert code == 1 and "codec.safetensors" in line, line


def test_train_teacher_with_a_truncated_checkpoint(data, tmp_path, capsys):
    assert main(TEACHER + ["--data", data["good"], "--codec", "pixel", "--out", str(tmp_path)]) == 0
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    code, line = _run(capsys, TEACHER + ["--data", data["good"], "--codec", "pixel", "--out", str(tmp_path),
                                         "--steps", "2"])
    assert code == 1 and "ckpt.pt" in line, line


# -- engines -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, named", [("doom:nonexistent", "nonexistent"), ("bogus:x", "bogus:x"),
                                        ("atari:nonexistent", "nonexistent")])
def test_record_from_an_unknown_engine_or_scenario(env, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # ViZDoom writes into the current directory
    code, line = _run(capsys, ["record", "--env", env, "--episodes", "1", "--out", str(tmp_path / "rec")])
    assert code == 1 and named in line, line


# -- arguments refused while parsing (exit status 2) -----------------------------------------------------
USAGE = [
    (["generate", "--frames", "0", "--bundle", "no-such-bundle"], "--frames"),
    (["generate", "--frames", "many", "--bundle", "no-such-bundle"], "--frames"),
    (["generate", "--threads", "-1", "--bundle", "no-such-bundle"], "--threads"),
    (["generate", "--steps", "0", "--bundle", "no-such-bundle"], "--steps"),
    (["generate", "--guidance", "nan", "--bundle", "no-such-bundle"], "--guidance"),
    (["generate", "--seed", "-1", "--bundle", "no-such-bundle"], "--seed"),
    (["generate", "--out", "x.badext", "--bundle", "no-such-bundle"], "--out"),
    (["generate", "--out", "noextension", "--bundle", "no-such-bundle"], "--out"),
    (["bench", "runtime", "--frames", "-3", "--bundle", "no-such-bundle"], "--frames"),
    (["record", "--env", "doom:basic", "--episodes", "-1", "--out", "x"], "--episodes"),
    (["record", "--env", "doom:basic", "--episodes", "1", "--out", "x", "--size", "0x8"], "--size"),
    (["record", "--env", "doom:basic", "--episodes", "1", "--out", "x", "--max-hold", "0"], "--max-hold"),
    (["record", "--env", "doom:basic", "--episodes", "1", "--out", "x", "--idle-prob", "1.5"], "--idle-prob"),
    (["record", "--env", "doom:basic", "--episodes", "1", "--out", "x", "--idle-hold", "9,3"], "--idle-hold"),
    # A missing bundle after the bad argument: should the argument get through, the command fails, not hangs.
    (["play", "--fps", "0", "--bundle", "no-such-bundle"], "--fps"),
    (["serve", "--fps", "0", "--bundle", "no-such-bundle"], "--fps"),
    (["bench", "latency", "--fps", "-1", "--bundle", "no-such-bundle"], "--fps"),
    (["bench", "latency", "--seconds", "0", "--bundle", "no-such-bundle"], "--seconds"),
    (["play", "--window", "0", "--bundle", "no-such-bundle"], "--window"),
    (["train", "teacher", "--data", "d", "--codec", "pixel", "--out", "o", "--lr", "0"], "--lr"),
    (["train", "teacher", "--data", "d", "--codec", "pixel", "--out", "o", "--steps", "0"], "--steps"),
    (["train", "teacher", "--data", "d", "--codec", "pixel", "--out", "o", "--threads", "-2"], "--threads"),
    (["train", "dcm", "--bundle", "b", "--out", "o", "--ema", "1.5"], "--ema"),
    (["train", "causal", "--bundle", "b", "--out", "o", "--batch", "0"], "--batch"),
    (["eval", "world", "--bundle", "b", "--env", "doom:basic", "--episodes", "0"], "--episodes"),
    (["eval", "world", "--bundle", "b", "--env", "doom:basic", "--video", "side.gif"], "--video"),
    (["eval", "world", "--bundle", "b", "--env", "doom:basic", "--frames", "grid.jpg"], "--frames"),
    (["eval", "longplay", "--frames", "0", "--bundle", "no-such-bundle"], "--frames"),
    (["eval", "longplay", "--seeds", "0", "--bundle", "no-such-bundle"], "--seeds"),
    (["eval", "gap", "--bundle", "b", "--data", "d", "--levels", "0.5,2"], "--levels"),
    (["train", "teacher", "--data", "d", "--codec", "pixel", "--out", "o", "--stack-frames", "-1"], "--stack-frames"),
    (["train", "teacher", "--data", "d", "--codec", "pixel", "--out", "o", "--camera-fov", "180"], "--camera-fov"),
    (["bench", "kernels", "--iters", "0"], "--iters"),
    (["ship", "--bundle", "b", "--out", "o", "--scenes", "0"], "--scenes"),
    (["generate", "--no-such-option"], "unrecognized"),
    # Refused by the command before it reads anything.
    (["train", "teacher", "--data", "d", "--codec", "pixel", "--out", "o", "--clip-frames", "2", "--sink-frames", "2"],
     "--sink-frames"),
    (["eval", "students", "dcm", "--out", "x.png"], "LABEL=RUN_DIR"),
]


@pytest.mark.parametrize("argv, named", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_bad_arguments_are_refused_with_one_line(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # should a bad argument get through, what the command writes lands here
    code, line = _run(capsys, argv)
    assert code == 2 and named in line, line


# -- actions files -------------------------------------------------------------------------------------
ACTIONS = {
    "not-json": ("[[1, 0", "JSON"),
    "not-a-list": ('{"keys": ["forward"]}', "list"),
    "empty": ("[]", "non-empty"),
    "unknown-key": ('[["jump"]]', "jump"),
    "nan": ("[[NaN, 0, 0, 0, 0]]", "finite"),
    "infinity": ("[[Infinity, 0, 0, 0, 0]]", "finite"),
    "huge": ("[[1e999, 0, 0, 0, 0]]", "finite"),
    "short-vector": ("[[1, 0]]", "shape"),
    "nested": ('[{"keys": [["forward"]]}]', "unknown action key"),
}


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_generate_refuses_a_malformed_actions_file(name, tmp_path, capsys):
    text, named = ACTIONS[name]
    actions = tmp_path / "actions.json"
    actions.write_text(text)
    out = tmp_path / "v.mp4"
    code, line = _run(capsys, ["generate", "--bundle", "random-tiny", "--frames", "2", "--actions", str(actions),
                               "--out", str(out)])
    assert code == 1 and "--actions" in line and named in line, line
    assert not out.exists()


def test_generate_names_a_missing_actions_file(tmp_path, capsys):
    code, line = _run(capsys, ["generate", "--bundle", "random-tiny", "--frames", "2", "--actions",
                               str(tmp_path / "nope.json"), "--out", str(tmp_path / "v.mp4")])
    assert code == 1 and "nope.json" in line, line


# -- the mechanism -----------------------------------------------------------------------------------
def test_a_bug_is_one_line_and_debug_mode_shows_the_traceback(monkeypatch, capsys):
    import runtime.commands

    def broken(_args):
        raise KeyError("oops")

    monkeypatch.setattr(runtime.commands, "_generate", broken)
    monkeypatch.delenv("FORCEKIT_DEBUG", raising=False)
    assert main(["generate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "FORCEKIT_DEBUG=1" in err
    monkeypatch.setenv("FORCEKIT_DEBUG", "1")
    with pytest.raises(KeyError, match="oops"):
        main(["generate"])


def test_debug_mode_lets_a_user_error_through(bundles, monkeypatch):
    monkeypatch.setenv("FORCEKIT_DEBUG", "1")
    with pytest.raises(BundleError, match="weights.safetensors"):
        main(["generate", "--bundle", bundles["truncated"]])


def test_the_entry_point_prints_one_line_and_no_traceback(bundles):
    for argv, code, named in [(["generate", "--bundle", bundles["garbage"]], 1, "config.json"),
                              (["record", "--env", "doom:basic", "--episodes", "-1", "--out", "x"], 2, "--episodes")]:
        out = subprocess.run([sys.executable, "-m", "forcekit", *argv], capture_output=True, text=True)
        assert out.returncode == code, out.stderr
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1 and named in out.stderr, out.stderr


def test_eval_codec_reads_a_bundle_codec_as_its_codec_dir(tmp_path, data, capsys):
    """A shipped model's codec is measured in place: eval codec takes the bundle dir too."""
    from dataclasses import replace

    from runtime.autoencoder import ConvAEConfig, ConvAutoencoder

    codec = ConvAutoencoder(ConvAEConfig(latent_channels=2)).eval()
    cfg = replace(ModelConfig.tiny(), in_channels=2, latent_height=2, latent_width=2, patch_size=(1, 1, 1))
    Bundle.random(cfg, codec=codec).save(tmp_path / "b")
    assert main(["eval", "codec", "--codec", str(tmp_path / "b"), "--data", data["good"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latent_shape"] == [2, 2, 2] and report["frames"] == 18 and report["sharpness_ratio"] > 0
