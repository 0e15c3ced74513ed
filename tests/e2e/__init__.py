"""End-to-end tests: the real launchers, SLURM, two nodes, preemption, the quality study and the examples."""
