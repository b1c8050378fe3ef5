"""Evaluation protocols."""

from editr1.evaluation.scenes import SceneEvalResult, evaluate_scenes

__all__ = ["SceneEvalResult", "evaluate_scenes"]
