"""`forcekit play` headless (SDL dummy driver) on a real tiny session, with injected key events."""

import os

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

pygame = pytest.importorskip("pygame")
av = pytest.importorskip("av")

from apps.play import PlayConfig, Player, keyboard_name  # noqa: E402
from runtime import Bundle, ModelConfig, open_session  # noqa: E402


def key_event(kind, key):
    return pygame.event.Event(kind, key=key, mod=0, unicode="", scancode=0)


def test_keyboard_names():
    assert keyboard_name("left shift") == "shift" and keyboard_name("W") == "w" and keyboard_name("up") == "up"


def test_play_headless_keys_change_actions_and_controls(tmp_path):
    session = open_session(Bundle.random(ModelConfig.tiny(), seed=0))
    received = []
    real_step = session.step

    def spy(action=None, **kw):  # records what the real session receives, then runs it
        received.append(tuple(sorted(action or ())))
        return real_step(action=action, **kw)

    session.step = spy
    player = Player(session, PlayConfig(window_min=64, record_dir=tmp_path))
    script = {
        3: [key_event(pygame.KEYDOWN, pygame.K_w), key_event(pygame.KEYDOWN, pygame.K_SPACE)],
        4: [key_event(pygame.KEYDOWN, pygame.K_F5)],  # start recording
        5: [key_event(pygame.KEYDOWN, pygame.K_q)],  # unbound: ignored
        10: [key_event(pygame.KEYUP, pygame.K_w)],
        14: [key_event(pygame.KEYDOWN, pygame.K_F4)],  # more steps
        16: [key_event(pygame.KEYDOWN, pygame.K_F5)],  # stop recording
        17: [key_event(pygame.KEYUP, pygame.K_SPACE)],
        22: [key_event(pygame.KEYDOWN, pygame.K_ESCAPE)],
    }
    keys_seen = {}

    def on_frame(p, frame):
        for event in script.get(p.frames_shown, []):
            pygame.event.post(event)
        keys_seen[p.frames_shown] = frame.keys

    steps_before = player.steps()
    stats = player.run(max_frames=200, on_frame=on_frame)

    assert not player.running and player.frames_shown < 40  # Esc quit well before max_frames
    assert ("attack", "forward") in received  # w + space while both were held
    assert ("attack",) in received  # after w was released
    assert received[0] == () and received[-1] == ()  # before the keys / after space went up
    first = received.index(("attack", "forward"))
    assert ("attack",) in received[first:] and () in received[first + 1:]
    assert ("q",) not in received
    assert session.steps == steps_before + 1
    assert stats["input_to_frame_ms"]["p50"] is not None and stats["frames_shown"] == player.frames_shown
    assert any(k == ("space", "w") for k in keys_seen.values())

    (video,) = player.recordings
    with av.open(str(video)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert 8 <= frames <= 16  # F5 at frame 4, again at frame 16
