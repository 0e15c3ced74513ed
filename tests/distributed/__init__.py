"""Distributed tests: 2 real ranks under torchrun (gloo, CPU) against a single-process reference; their drivers
are in drivers/."""
