"""Multi-process training: every process is one data-parallel rank; FSDP2 shards the frozen base.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` with all processes in one data-parallel
mesh. With ``shard: true`` the module's ``configure_model`` applies ``fully_shard`` (FSDP2) to the
policy (transformer blocks, then the frozen text encoders' layers, each, then the roots): every rank
holds a slice of the base and of the LoRA weights, and gradients are reduce-scattered. With
``shard: false`` each rank keeps the whole model and the LoRA gradients are all-reduced after the
step's micro-batches (plain data parallelism without a DDP wrapper, which does not fit several
backward passes per step with manual optimisation).

Either way groups stay whole on one rank (so K never depends on the device count), the reward std
and the filter's decision are computed over all ranks' rewards, every rank runs the same number of
forward calls (idle work where it has fewer samples), and a step is skipped on all ranks together.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Args:
    shard: shard the policy with FSDP2 (``False``: replicate it, all-reduce LoRA gradients).
    save_distributed_checkpoint: ``False`` (default) writes one file on rank 0 with the adapters
        gathered whole; ``True`` writes Lightning's sharded checkpoint folder.
    process_group_backend: ``nccl`` / ``gloo``; default from the device.
    timeout: collective timeout.
    """

    def __init__(
        self,
        shard: bool = True,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.shard = shard

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The adapter weights only, gathered whole (a collective: every rank calls it). The frozen base is
        never gathered or saved."""
        if self._save_distributed_checkpoint:
            return super().lightning_module_state_dict()
        out: dict[str, Any] = {}
        for name, param in self.lightning_module.named_parameters():
            if "lora_" in name:
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                out[name] = full.detach().cpu()
        return out

    def setup_environment(self) -> None:
        # one data-parallel dimension over every process (the parent's default puts processes of a node
        # on the tensor-parallel axis)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()
