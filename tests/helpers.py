"""Small builders shared by the runtime tests, and the loopback set-up the serve tests share."""

import asyncio

import torch

from runtime import ChunkCondition, ModelConfig, Rollout, SamplerConfig
from runtime.model import CausalDiT
from training.latents import LatentClips


def tiny_model(seed: int = 0, **overrides) -> CausalDiT:
    torch.manual_seed(seed)
    return CausalDiT(ModelConfig.tiny(**overrides)).eval()


def rollout_latents(model: CausalDiT, sampler: SamplerConfig, chunks: int, kv_cache: bool, seed: int = 0,
                    actions_seed: int = 1, fuse_commit: bool = False) -> torch.Tensor:
    """Generate ``chunks`` chunks with fixed noise and random actions; return all x0 latents."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    act_gen = torch.Generator().manual_seed(actions_seed)
    ro = Rollout(model, sampler, batch=1, kv_cache=kv_cache, generator=gen, fuse_commit=fuse_commit)
    out = []
    with torch.no_grad():
        for _ in range(chunks):
            n = ro.next_chunk_frames()
            action = (torch.rand(1, n, cfg.actions.dim, generator=act_gen) > 0.5).float()
            noise = torch.randn(1, n, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
            out.append(ro.generate_chunk(noise, ChunkCondition(action=action)))
    return torch.cat(out, dim=1)


def moving_clips(shifts: dict[int, int], frames: int = 400, action_dim: int = 3) -> LatentClips:
    """One episode of random latents where holding key a rolls the view by shifts[a] pixels."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randint(len(shifts) + 1, (frames,), generator=gen)  # the last index: no key
    lat = [torch.randn(3, 8, 12, generator=gen)]
    cond = torch.zeros(frames, action_dim)
    for f in range(1, frames):
        k = int(keys[f])
        if k < len(shifts):
            cond[f, k] = 1
        nxt = torch.roll(lat[-1], shifts.get(k, 0), -1) + 0.05 * torch.randn(3, 8, 12, generator=gen)
        lat.append(nxt)
    return LatentClips(torch.stack(lat).half(), cond, [(0, frames, 0)])


def run(coro, timeout: float = 120):
    """Run a test coroutine to completion, failing (not hanging) after `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def started(app):
    """Start an aiohttp app on a free loopback port; return (runner, base URL)."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def wait_until(predicate, timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds; TimeoutError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


def client_offer_sdp() -> str:
    """A real offer as the Python client makes it (recvonly video + data channel)."""

    async def make():
        from aiortc import RTCConfiguration, RTCPeerConnection

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("input")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())
