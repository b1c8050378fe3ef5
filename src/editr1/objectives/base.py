"""The objective interface: what a batch must carry, and the loss of one micro-batch.

:class:`editr1.module.EditR1Module` runs one shared path for every objective — prepare the step, split
its samples into micro-batches (idle ones where a sharded process has fewer), backward each, sum the
gradients over processes, clip, step, update θ_old / EMA, log — and asks the objective only for the parts
that differ. An objective that needs per-step log-probabilities of an SDE rollout (Flow-GRPO) keeps them
in its rollout and walks the rollout's steps in :meth:`Objective.micro_batch`, calling backward once per
step; the module does not care how many backward calls a micro-batch makes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from editr1.module import EditR1Module
    from editr1.sampling import SDESampling


@dataclass
class Work:
    """One process's share of a training step, prepared once by :meth:`Objective.prepare`.

    Attributes:
        count: samples of this process that get a loss; the module splits positions ``0 … count − 1``
            into micro-batches.
        rows: prompts (groups or rows) behind them, for Lightning's logging.
        can_idle: whether an idle micro-batch (the same forward/backward calls, zero weight) can run on
            this process's data — sharded runs need every process to make the same calls.
        data: the objective's own state for the step (rollout, timesteps, conditions, …).
        samples: samples this step produced or read (rollout edits, rows), for ``samples_per_s``.
        started: ``time.perf_counter()`` when the step's work began (the reward stage's start for rollouts);
            ``None``: when ``training_step`` began.
    """

    count: int
    rows: int = 0
    can_idle: bool = True
    data: Any = None
    samples: int = 0
    started: float | None = None


class Objective(ABC):
    """One training objective.

    Attributes:
        name: the ``model.objective`` value that selects it.
        needs: ``rollouts`` (the reward stage must put an :class:`~editr1.training.experience.Experience`
            in the batch) or ``targets`` (rows carry target images).
        main_metric: the metric ``training_step`` returns.
        progress_bar: the metric shown on the progress bar besides ``reward/mean`` (``None``: none).
        keep_old: η override of θ_old ← η·θ_old + (1 − η)·θ after each step (``None``: the old-policy
            schedule; 0 makes θ_old track θ exactly).
        steps_without_samples: whether a step with nothing to train on anywhere still takes an optimiser
            step (on a zero gradient).
    """

    name: ClassVar[str]
    needs: ClassVar[Literal["rollouts", "targets"]]
    main_metric: ClassVar[str]
    progress_bar: ClassVar[str | None] = "loss"
    keep_old: ClassVar[float | None] = None

    def __init__(self, settings) -> None:
        self.settings = settings

    @property
    def micro_batch_size(self) -> int:
        return int(self.settings.micro_batch_size)

    @property
    def steps_without_samples(self) -> bool:
        return False

    @property
    def rollout_sde(self) -> SDESampling | None:
        """How rollouts are sampled: ``None``, the ODE solver of ``model.rollout``; an
        :class:`~editr1.sampling.SDESampling`, Flow-GRPO's SDE with the trajectory kept in the rollout."""
        return None

    def group_settings(self) -> tuple[str, float]:
        """``(std_mode, adv_clip)`` for the advantages of the reward stage (objectives trained on rollouts)."""
        raise NotImplementedError(f"objective {self.name!r} is not trained on rewarded rollouts")

    @abstractmethod
    def prepare(self, module: EditR1Module, batch: dict) -> Work:
        """Everything the step's micro-batches share, computed once; clear errors for a batch that lacks
        what the objective needs."""

    @abstractmethod
    def micro_batch(self, module: EditR1Module, work: Work, positions: list[int], idle: bool, total: int) -> dict:
        """Forward, loss and ``module.manual_backward`` for the samples at ``positions`` of ``work``.

        ``total``: samples that get a loss on all processes together. ``idle``: make the same calls with zero
        weight (``positions`` is then ``[0]``). Returns sums over the micro-batch's samples for
        :meth:`metrics` (ignored when idle).
        """

    @abstractmethod
    def metrics(self, module: EditR1Module, work: Work, sums: dict) -> dict[str, float]:
        """The step's metrics from the summed micro-batch figures (after the optimiser step)."""
