"""Build the genops definitions against a temporary data directory, for in-process runs."""

from __future__ import annotations

import socket
from pathlib import Path

import dagster as dg

from genops_assets.definitions import asset_definitions
from resources import build_resources
from resources.task import TaskResource


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_defs(home: Path, port: int, tasks_dir: Path | None = None) -> dg.Definitions:
    res = build_resources(home=home, port=port, judge_port=free_port())
    if tasks_dir is not None:
        res["task"] = TaskResource(tasks_dir=str(tasks_dir), name=res["task"].name)
    return dg.Definitions.merge(asset_definitions(), dg.Definitions(resources=res))


def tiny_run_config(model_dir: Path, steps: int = 2, examples: int = 4, margin: float = -1.0) -> dict:
    """Seconds-long settings: the tiny model, a few steps, a few golden examples.

    margin=-1 lets the random tiny model pass the gate so the deploy step runs too.
    """
    return {
        "ops": {
            "base_model": {"config": {"model_path": str(model_dir)}},
            "tuned_adapter": {"config": {"max_steps": steps, "max_train_examples": 8, "batch_size": 2,
                                         "eval_every": 0, "save_every": 1, "log_every": 1, "rank": 4, "alpha": 8}},
            "eval_report": {"config": {"max_examples": examples, "batch_size": 4, "margin": margin,
                                       "base_few_shot": 1}},
            "sxs_evaluation": {"config": {"max_examples": examples}},
        }
    }


def events_by_type(result, event_type: dg.DagsterEventType):
    return [e for e in result.all_events if e.event_type == event_type]


def check_results(result) -> dict[str, bool]:
    out = {}
    for e in events_by_type(result, dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        data = e.event_specific_data
        out[data.check_name] = data.passed
    return out


def materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in events_by_type(result, dg.DagsterEventType.ASSET_MATERIALIZATION)}
