"""Benchmark tasks and their registry."""
from __future__ import annotations

import difflib

from .base import SCALES, GroundTruthConfig, Recipe, ScaleConfig, Splits, Task, check_scale
from .logistic import CancerLR, DiabetesLR
from .mlp import ConcreteMLP, EnergyMLP, FashionMLP, MnistMLP
from .autoencoder import MnistAutoencoder
from .cnn import CNN_TASKS
from .transformer import PTBTransformer

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    CancerLR, DiabetesLR, ConcreteMLP, EnergyMLP, MnistMLP, FashionMLP, MnistAutoencoder, *CNN_TASKS,
    PTBTransformer)}


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def default_tasks(scale: str) -> list[str]:
    """The tasks that run at `scale` when none is named (Task.default_scales), in registry order."""
    return [name for name, cls in TASKS.items() if scale in cls.default_scales]


def get_task(name: str) -> Task:
    """The registered task called `name` (a clear error with suggestions otherwise)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}.{did_you_mean(name, TASKS)} Known tasks: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["SCALES", "TASKS", "GroundTruthConfig", "Recipe", "ScaleConfig", "Splits", "Task", "check_scale",
           "default_tasks", "get_task", "did_you_mean"]
