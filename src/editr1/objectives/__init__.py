"""Training objectives behind one interface (:class:`~editr1.objectives.base.Objective`)."""

from editr1.objectives.awm import AWMObjective
from editr1.objectives.base import Objective, Work
from editr1.objectives.flow_grpo import FlowGRPOObjective
from editr1.objectives.nft import NFTObjective
from editr1.objectives.sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (NFTObjective, SFTObjective, FlowGRPOObjective, AWMObjective)
}

__all__ = ["OBJECTIVES", "AWMObjective", "FlowGRPOObjective", "NFTObjective", "Objective", "SFTObjective", "Work"]
