"""Reward models: the interface, the verifiable scene reward and the MLLM judges (local and served)."""

from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rewards.mllm import LocalMLLMReward, MLLMJudge
from editr1.rewards.scenes import SceneReward, scene_reward
from editr1.rewards.served import ServedMLLMReward

__all__ = [
    "LocalMLLMReward",
    "MLLMJudge",
    "RewardInputs",
    "RewardModel",
    "SceneReward",
    "ServedMLLMReward",
    "scene_reward",
]
