"""Reward models: the interface, the verifiable scene reward, the MLLM judges (local and served), a preservation
reward and several rewards combined.

The names below load on first use, so ``editr1 serve-reward --help`` does not import every reward first."""

from importlib import import_module

_HOMES = {
    "CombinedReward": "editr1.rewards.combined",
    "PreservationReward": "editr1.rewards.preservation",
    "LocalMLLMReward": "editr1.rewards.mllm",
    "MLLMJudge": "editr1.rewards.mllm",
    "RewardInputs": "editr1.rewards.base",
    "RewardModel": "editr1.rewards.base",
    "SceneReward": "editr1.rewards.scenes",
    "ServedMLLMReward": "editr1.rewards.served",
    "ServedScalarReward": "editr1.rewards.served_scalar",
    "scene_reward": "editr1.rewards.scenes",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'editr1.rewards' has no attribute {name!r}")
