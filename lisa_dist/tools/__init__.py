"""Tools around runs: the memory planner (and its reading of a run's config), export, trying a model (generate),
plots of runs and prepare-model. (The baselines, collective byte counting and host-sync counting, which only the
benchmarks and tests use, live in benchmarks.lib.)"""

from lisa_dist.tools.exporter import export
from lisa_dist.tools.generation import continue_ids, generate, load_for_generation
from lisa_dist.tools.memory import (
    BACKENDS,
    METHOD_NAMES,
    METHODS,
    MODEL_PRESETS,
    Setup,
    estimate,
    longest_seq_len,
    model_config,
    plan,
    shapes_of,
    shapes_of_model,
    table,
)
from lisa_dist.tools.planning import config_world_size, plan_config, planner_backend
from lisa_dist.tools.plot import load_run, plot_runs
from lisa_dist.tools.prepare import prepare_model

__all__ = [
    "BACKENDS",
    "METHODS",
    "METHOD_NAMES",
    "MODEL_PRESETS",
    "Setup",
    "config_world_size",
    "continue_ids",
    "estimate",
    "export",
    "generate",
    "load_for_generation",
    "load_run",
    "longest_seq_len",
    "model_config",
    "plan",
    "plan_config",
    "planner_backend",
    "plot_runs",
    "prepare_model",
    "shapes_of",
    "shapes_of_model",
    "table",
]
