"""Lightning callbacks, one a file: the reward stage (:class:`RewardCallback`) and observers that only
read the module — prediction writing, scene evaluation, LoRA export, benchmark evaluation."""

from editr1.callbacks.benchmark import BenchmarkEvaluation
from editr1.callbacks.export_lora import ExportLora
from editr1.callbacks.image_writer import ImageWriter
from editr1.callbacks.progress import StepProgressBar
from editr1.callbacks.reward import RewardCallback, check_rewards
from editr1.callbacks.run_clock import RunClock
from editr1.callbacks.run_guard import RunGuard
from editr1.callbacks.scene_evaluation import SceneEvaluation
from editr1.settings import FilterSettings

__all__ = [
    "BenchmarkEvaluation",
    "ExportLora",
    "FilterSettings",
    "ImageWriter",
    "RewardCallback",
    "RunClock",
    "RunGuard",
    "SceneEvaluation",
    "StepProgressBar",
    "check_rewards",
]
