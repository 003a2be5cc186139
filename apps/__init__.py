"""Apps over runtime sessions: the pygame player and the WebRTC server (no lip-sync loop yet)."""
