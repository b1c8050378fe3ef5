"""``editr1 plan``: the memory a run needs per process, from the model built on the meta device.

``trace`` simulates the model's own work on the meta device (activation peaks), ``estimate`` is the arithmetic of
the persistent state under the FSDP2 plan, ``measure`` measures real peaks (CPU profiler, CUDA allocator) to check
the simulation, ``command`` is the verb."""
