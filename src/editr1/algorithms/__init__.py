"""The Edit-R1 algorithm as small pure-torch functions (no Lightning)."""

from editr1.algorithms.grouping import (
    GroupDecision,
    advantages,
    decide,
    global_std,
    group_stats,
    low_variance_drop,
    optimality_probability,
)
from editr1.algorithms.nft import NFTLoss, add_noise, ema_decay, nft_loss, old_policy_eta
from editr1.algorithms.timesteps import continuous_timesteps, num_train_timesteps, rollout_timesteps, train_timesteps

__all__ = [
    "GroupDecision",
    "NFTLoss",
    "add_noise",
    "advantages",
    "continuous_timesteps",
    "decide",
    "ema_decay",
    "global_std",
    "group_stats",
    "low_variance_drop",
    "nft_loss",
    "num_train_timesteps",
    "old_policy_eta",
    "optimality_probability",
    "rollout_timesteps",
    "train_timesteps",
]
