"""The framework behind OmegaDiT's entry points: registries, objectives, samplers, conditioners, checkpoints.

ARCHITECTURE.md at the repository root maps the modules and the two data paths.
"""
