"""Reward models: the interface and the verifiable synthetic-scene reward."""

from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rewards.scenes import SceneReward, scene_reward

__all__ = ["RewardInputs", "RewardModel", "SceneReward", "scene_reward"]
