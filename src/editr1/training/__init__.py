"""The pieces of a training step that are neither algorithm nor Lightning glue: the rollout and the
experience it becomes (:mod:`~editr1.training.rollout`, :mod:`~editr1.training.experience`), the helpers
every process uses to agree (:mod:`~editr1.training.distributed`) and checkpoint state
(:mod:`~editr1.training.state`)."""
