"""How an asset function written once is bound to one task.

The asset families keep their functions at module level, undecorated, with a ``task: TaskRef``
parameter; each family's ``build_*`` factory decorates them per task. ``bind_task`` fixes that
parameter and hides it from Dagster, which sees the rest of the signature (context, config,
upstream values, resources) as usual.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

import dagster as dg

from genops_assets.lib.tasks import TaskRef


def bind_task(fn: Callable[..., Any], task: TaskRef) -> Callable[..., Any]:
    """``fn`` with its ``task`` parameter fixed to ``task`` (name, docstring kept)."""
    sig = inspect.signature(fn)
    if "task" not in sig.parameters:
        raise TypeError(f"{fn.__qualname__} has no 'task' parameter to bind")
    # Annotations resolved in fn's own module: Dagster reads them from the wrapper, whose
    # module does not import the resource and config classes they name.
    hints = typing.get_type_hints(fn)
    params = [p.replace(annotation=hints.get(name, p.annotation))
              for name, p in sig.parameters.items() if name != "task"]

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def bound(*args, **kwargs):
            yield from fn(*args, task=task, **kwargs)
    else:
        @functools.wraps(fn)
        def bound(*args, **kwargs):
            return fn(*args, task=task, **kwargs)

    bound.__signature__ = sig.replace(parameters=params,  # type: ignore[attr-defined]
                                      return_annotation=hints.get("return", sig.return_annotation))
    bound.__annotations__ = {k: v for k, v in hints.items() if k != "task"}
    return bound


def task_key(task: TaskRef | str, name: str) -> dg.AssetKey:
    """The key of a task's asset: ``<task>/<name>``."""
    return dg.AssetKey([task if isinstance(task, str) else task.name, name])


def task_ins(task: TaskRef, *names: str) -> dict[str, dg.AssetIn]:
    """Inputs named after upstream assets of the same task (Dagster infers unprefixed keys
    from parameter names, which is right for shared assets such as ``base_model``)."""
    return {name: dg.AssetIn(key=task_key(task, name)) for name in names}


def task_group(task: TaskRef, stage: str) -> str:
    """Asset group of one stage of a task, e.g. ``support_triage_tuning``."""
    return f"{task.name}_{stage}"
