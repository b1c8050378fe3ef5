"""Training objectives behind one interface (:class:`~editr1.objectives.base.Objective`)."""

from editr1.objectives.base import Objective, Work
from editr1.objectives.nft import NFTObjective
from editr1.objectives.sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (NFTObjective, SFTObjective)}

__all__ = ["OBJECTIVES", "NFTObjective", "Objective", "SFTObjective", "Work"]
