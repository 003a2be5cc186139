"""The GPU step's logic, checked on a CPU: bf16 weights and cache, captured passes, overlapped decode."""

import numpy as np
import pytest
import torch

from runtime import Bundle, ModelConfig, SamplerConfig, StreamSession
from runtime.context import sink_shift
from runtime.cuda_step import CudaStepModel, EagerGraphRunner, OverlappedStream, StepOptions

PATTERN = dict(frames_per_chunk=2, window_frames=4, sink_frames=1)  # the ring cycles every 2 chunks


def bundle(seed=0, guidance=1.0, **overrides):
    torch.manual_seed(seed)
    return Bundle.random(ModelConfig.tiny(**{**PATTERN, **overrides}), sampler=SamplerConfig(
        steps=2, guidance_scale=guidance))


def latents(session, chunks, actions_seed=3):
    rng = np.random.default_rng(actions_seed)
    keys = session.action_space.keys
    out = []
    for _ in range(chunks):
        held = [k for k in keys if rng.random() < 0.4] or None
        out.append(session.generate_latents(held))
    return torch.cat(out)


@pytest.mark.parametrize("guidance, pattern", [
    (1.0, {}), (2.0, {}), (1.0, dict(frames_per_chunk=1, first_chunk_frames=3, window_frames=3, sink_frames=2)),
], ids=["plain", "guided", "frame-wise-sink-2"])
def test_captured_passes_replay_what_eager_passes_compute(guidance, pattern):
    """Every layout is captured within the first 16 chunks; the next 16 replay only, at frames (and so
    sink shifts, `runtime.context.sink_shift`) no graph was captured at, and must match eager exactly."""
    b = bundle(guidance=guidance, **pattern)
    cfg = b.model.config
    plain = StreamSession(b, seed=5)
    eager = torch.cat([latents(plain, 16), latents(plain, 16)])  # as the captured stream runs: in two halves
    runner = CudaStepModel(b.model, StepOptions(capture="graphs"), graph_runner=EagerGraphRunner)
    captured = StreamSession(b, seed=5, runner=runner)
    first = latents(captured, 16)
    captures, replays = runner.captures, runner.replays
    assert replays > captures > 0

    def shift() -> int:
        return sink_shift(captured._rollout.cache.next_frame, cfg.window_frames, cfg.sink_frames)

    steady = shift()
    assert steady > 0  # the stream is past the sink: the steady state's graphs read it shifted
    second = latents(captured, 16)
    assert runner.captures == captures and runner.replays > replays  # no graph per chunk: the shift is an input
    assert shift() >= steady + 16  # ... and replayed at shifts it was never captured at
    assert (torch.cat([first, second]) - eager).abs().max().item() <= 1e-5
    captured.reset(5)  # a new stream meets the same layouts again: everything replays
    again = torch.cat([latents(captured, 16), latents(captured, 16)])
    assert runner.captures == captures and (again - eager).abs().max().item() <= 1e-5


def test_capture_keys_hold_the_cache_layout():
    """Passes at the same shapes but another ring position or fill level are separate graphs."""
    b = bundle()
    runner = CudaStepModel(b.model, StepOptions(capture="graphs"), graph_runner=EagerGraphRunner)
    session = StreamSession(b, runner=runner)
    latents(session, 12)
    states = {key[1] for key in runner._graphs}
    assert len(states) >= 4  # sink filling, window filling, and the ring's positions
    assert runner.captures == len(runner._graphs) <= 2 * 12


def test_capture_keys_hold_the_sink_phase():
    """Frame-wise, the ring comes back to the position the window filled at once the sink has started to
    move: same layout, but the pass now rotates the sink (and the fused commit gathers it twice), so it
    is another graph (`KVCache.sink_phase`); the shift's size is not in the key."""
    b = bundle(frames_per_chunk=1, first_chunk_frames=3, window_frames=3, sink_frames=2)
    runner = CudaStepModel(b.model, StepOptions(capture="graphs"), graph_runner=EagerGraphRunner)
    latents(StreamSession(b, runner=runner), 16)
    phases: dict[tuple, set] = {}
    for flags, state, phase, _ in runner._graphs:
        phases.setdefault((flags, state), set()).add(phase)
    assert {(False, False), (False, True), (True, True)} <= set().union(*phases.values())
    assert max(len(p) for p in phases.values()) == 2


def test_bf16_weights_and_cache_keep_the_sampler_in_fp32():
    b = bundle()
    ref_session = StreamSession(b, seed=1)
    ref = latents(ref_session, 4)
    fp32_bytes = ref_session.stats()["kv_cache_bytes"]
    low = StreamSession(bundle(), seed=1, runner=CudaStepModel(bundle().model, StepOptions(dtype="bf16")))
    out = latents(low, 4)
    assert out.dtype == torch.float32 and low._rollout.cache._buf.dtype == torch.bfloat16
    assert low.stats()["kv_cache_bytes"] * 2 == fp32_bytes
    err = (out - ref).abs().max().item()
    assert 0 < err <= 0.1 * ref.abs().max().item()


def test_compiled_path_matches_eager():
    """torch.compile's graph capture (the "eager" backend: no compiler on a test machine), across the
    fused commit and a cache that starts evicting: the cache bookkeeping stays outside the graphs."""
    torch._dynamo.reset()
    b = bundle(num_layers=1, window_frames=2)
    eager = latents(StreamSession(b, seed=2), 3)
    runner = CudaStepModel(b.model, StepOptions(capture="compile", compile_backend="eager"))
    assert (latents(StreamSession(b, seed=2, runner=runner), 3) - eager).abs().max().item() <= 1e-5
    torch._dynamo.reset()


def test_overlapped_stream_delivers_the_same_frames_one_chunk_later():
    b = bundle()
    plain = StreamSession(b, seed=4)
    expected = [plain.step(["forward"]) for _ in range(5)]
    stream = OverlappedStream(StreamSession(b, seed=4))
    got = [stream.step(["forward"]) for _ in range(5)]
    assert [len(f) for f in got] == [2, 0, 2, 2, 2]  # first chunk at once, then one chunk behind
    last = stream.flush()
    assert len(last) == 2 and len(stream.flush()) == 0
    assert np.array_equal(np.concatenate(got + [last]), np.concatenate(expected))
    assert stream.session.stats()["frames"] == 10
    stream.reset(4)
    assert np.array_equal(stream.step(["forward"]), expected[0])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        StepOptions(dtype="int8")
    with pytest.raises(ValueError, match="capture must be one of"):
        StepOptions(capture="tape")


@pytest.mark.gpu
def test_cuda_graphs_match_eager_on_cuda():
    b = bundle()
    eager = latents(StreamSession(b, device="cuda", seed=5,
                                  runner=CudaStepModel(bundle().model, StepOptions(dtype="bf16"))), 12)
    runner = CudaStepModel(bundle().model, StepOptions(dtype="bf16", capture="graphs"))
    graphed = latents(StreamSession(bundle(), device="cuda", seed=5, runner=runner), 12)
    assert runner.replays > 0
    assert (graphed - eager).abs().max().item() <= 1e-2


@pytest.mark.gpu
def test_overlapped_stream_on_cuda_matches_sequential():
    b = bundle()
    plain = StreamSession(b, device="cuda", seed=4)
    expected = np.concatenate([plain.step(None) for _ in range(4)])
    stream = OverlappedStream(StreamSession(bundle(), device="cuda", seed=4))
    got = np.concatenate([stream.step(None) for _ in range(4)] + [stream.flush()])
    assert np.array_equal(got, expected)
