"""Recipes: which networks train, in which stages, with which optimiser groups (see base.py)."""
from .base import Group, Recipe, Stage, StepOutput
from .distill import Distiller
from .online import OnlineDistillation
from .teachers import PrecomputedTeacher

__all__ = ["Distiller", "OnlineDistillation", "PrecomputedTeacher", "Group", "Recipe", "Stage", "StepOutput"]
