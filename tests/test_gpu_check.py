"""The prepared GPU run works the first time: its script parses, its bench commands run at tiny size,
and its report merges what the steps wrote."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forcekit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_script_parses_and_names_every_step():
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for needle in ("-m gpu", "bench kernels", "--bundle \"$BUNDLE\"", "--baseline diffusers", "for s in 2 4",
                   "gpu_check_report.py", "--tiny", "FORCEKIT_WHEELS"):
        assert needle in text


def test_report_merges_steps(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gpu_check_report import main as report_main
    finally:
        sys.path.pop(0)
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "steps.tsv").write_text("gpu_tests\t0\t12\nbench_kernels\t124\t110\nbench_runtime_2steps\t0\t40\n")
    (parts / "gpu_tests.log").write_text("3 passed\n")
    (parts / "bench_kernels.log").write_text("compiling...\n")
    (parts / "bench_runtime_2steps.json").write_text(json.dumps({"fps": 41.5}))
    assert report_main([str(tmp_path), "0", "170"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["gpu_tests", "bench_kernels", "bench_runtime_2steps"]
    assert steps["bench_runtime_2steps"]["result"] == {"fps": 41.5}
    assert steps["bench_kernels"]["timed_out"] and "compiling" in steps["bench_kernels"]["log_tail"]
    assert report["all_ok"] is False and report["total_seconds"] == 170 and "torch" in report["machine"]


def test_bench_runtime_gpu_options_at_tiny_size(capsys):
    assert main(["bench", "runtime", "--bundle", "random-tiny", "--frames", "4", "--steps", "1", "--json",
                 "--dtype", "bf16", "--overlap", "--warmup"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bf16" and result["overlap"]["frames"] == 4 and result["kv_cache_speedup"] > 0
    if not torch.cuda.is_available():
        assert main(["bench", "runtime", "--capture", "graphs", "--frames", "2"]) == 2
        assert "needs --device cuda" in capsys.readouterr().err


def test_diffusers_baseline_runs_the_bundles_weights():
    pytest.importorskip("diffusers")
    from runtime import Bundle, ModelConfig
    from runtime.presets import tiny_wan_vae_config
    from runtime.wan_baseline import diffusers_wan_from, measure_diffusers_baseline
    from runtime.wan_vae import WanVAECodec

    torch.manual_seed(0)
    cfg = ModelConfig.tiny(in_channels=4, latent_height=2, latent_width=2, action_space={}, text_dim=32,
                           frames_per_chunk=3, window_frames=3, sink_frames=3)
    bundle = Bundle.random(cfg, codec=WanVAECodec(tiny_wan_vae_config(z_dim=4)))
    wan = diffusers_wan_from(bundle.model)
    x, t, text = torch.randn(1, 3, 4, 2, 2), torch.tensor([[0.0, 0.5, 0.5]]), torch.randn(1, 5, 32)
    with torch.no_grad():
        ours = bundle.model(x, t, text=text)
        theirs = wan(x.transpose(1, 2), (t * 1000).repeat_interleave(1, dim=1), encoder_hidden_states=text,
                     return_dict=False)[0].transpose(1, 2)
    assert (ours - theirs).abs().max().item() <= 1e-4  # the same weights, the same function
    result = measure_diffusers_baseline(bundle, torch.device("cpu"), frames=9, steps=1, text=text)
    assert result["chunks"] == 3 and result["frames"] == 9 + 12 + 12 and result["fps"] > 0
    with pytest.raises(ValueError, match="adapters diffusers does not have"):
        diffusers_wan_from(Bundle.random().model)
