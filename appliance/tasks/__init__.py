"""Maintenance tasks: chosen by name from `TASKS` (a table in code) and run by `TaskRunner`."""

from .runner import TaskRunner
from .table import TASKS, TaskContext

__all__ = ["TASKS", "TaskContext", "TaskRunner"]
