"""editr1: Edit-R1 post-training of instruction-based image editors with reinforcement learning."""

__version__ = "0.1.0"
