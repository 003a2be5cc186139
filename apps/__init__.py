"""Apps: the pygame player, the WebRTC server and the lip-sync loop, all over runtime sessions."""
