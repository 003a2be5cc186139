"""Recorded game data: atomic sharded storage, the recorder, and a lazy clip dataset.

Alignment convention (used everywhere in forcekit): within an episode, `actions[t]` is the
action taken while frame t was on screen; it is the action that produced frame t+1. The last
action of an episode is the one that ended it (its resulting frame is not stored). A world
model therefore conditions frame t+1 on `actions[t]`.
"""

from training.data.dataset import ClipDataset
from training.data.shards import ShardError, ShardStore, check_dir

__all__ = ["ClipDataset", "ShardError", "ShardStore", "check_dir"]
