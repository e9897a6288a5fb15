"""Recipes: which networks train, in which stages, with which optimiser groups (see base.py)."""
from .base import Group, Recipe, Stage, StepOutput
from .distill import Distiller

__all__ = ["Distiller", "Group", "Recipe", "Stage", "StepOutput"]
