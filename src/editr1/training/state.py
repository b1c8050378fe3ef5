"""Checkpoint state beyond the adapters: global RNG states and the emergency checkpoint a stopping run
writes."""

from __future__ import annotations

from pathlib import Path

import torch


def rng_states() -> dict:
    """torch, NumPy and Python global RNG states as tensors and plain numbers (loadable with
    ``weights_only=True``). Every draw of the algorithm comes from per-sample seeds; these cover the rest."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_rng_states(state: dict) -> None:
    """Restore what :func:`rng_states` saved."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))


def gathered_rng_states(world: int) -> list[dict]:
    """Every process's :func:`rng_states`, in rank order (one entry on one process)."""
    if world == 1:
        return [rng_states()]
    from editr1.training import distributed

    return distributed.gather_objects(rng_states(), world=world)


def restore_rng_states(states: list[dict] | None, rank: int) -> None:
    """Restore this rank's entry of :func:`gathered_rng_states` (rank 0's when the run had fewer processes)."""
    if states:
        set_rng_states(states[rank] if rank < len(states) else states[0])


def emergency_checkpoint(trainer, reason: str) -> str:
    """Save the run's state to ``<run>/checkpoints/stopped-<reason>-step<N>.ckpt`` before it stops; returns
    the path (for the error message)."""
    root = Path(trainer.log_dir or trainer.default_root_dir)
    path = root / "checkpoints" / f"stopped-{reason}-step{trainer.global_step}.ckpt"
    trainer.save_checkpoint(str(path))
    return str(path)
