"""Preference tuning from people's ratings: enough new agreed training pairs in the rating store
request a preference-tuning (DPO) run of the task."""

from __future__ import annotations

import json

import dagster as dg

from genops_assets.components.binding import bind_task
from genops_assets.defs.jobs import preference_tuning_job_name
from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.tasks import TaskRef
from resources.paths import GenopsHome
from sensors.feedback import CURSOR_DIGEST_CHARS, consumed_digests

SENSOR = "preference_pairs_sensor"


def preference_pairs_sensor(context: dg.SensorEvaluationContext, task: TaskRef, home: GenopsHome):
    """Agreed ``train`` pairs of the task from the rating store (lib/agreement.py ``agreed_pairs``,
    the rules the ``preference_pairs`` mart is built by); at least ``feedback.min_new_pairs`` not
    yet covered by a run request -> one run of the preference-tuning job, run key = digest of
    every current train pair, so the same pairs never train twice."""
    from genops_assets.lib.agreement import agreed_pairs
    from genops_assets.lib.ratings import RatingStore

    spec = task.load()
    path = home.ratings_path
    if not path.is_file():
        return dg.SkipReason(f"no rating store yet at {path}")
    train = sorted(p.pair_id for p in agreed_pairs(RatingStore(path), spec) if p.split == "train")
    consumed = consumed_digests(context.cursor, spec.name, f"{spec.name}_{SENSOR}")
    new = [p for p in train if p[:CURSOR_DIGEST_CHARS] not in consumed]
    need = spec.feedback.min_new_pairs
    if len(new) < need:
        return dg.SkipReason(f"{len(new)} new agreed train pair(s) of {len(train)}, threshold {need} "
                             "(feedback.min_new_pairs)")
    digest = sha256_json(train)
    context.log.info(f"{len(new)} new agreed train pairs ({len(train)} in all) -> preference tuning of {spec.name}, "
                     f"pairs digest {digest[:12]}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(
            run_key=f"preference_pairs:{spec.name}:{digest}",
            tags={"genops/trigger": "preference_pairs", "genops/task": spec.name, "genops/pairs_digest": digest,
                  "genops/train_pairs": str(len(train)), "genops/new_train_pairs": str(len(new))},
        )],
        # The pairs present now: a pair that stops being agreed (more ratings) leaves the cursor.
        cursor=json.dumps({"task": spec.name, "consumed": [p[:CURSOR_DIGEST_CHARS] for p in train]}),
    )


def build_preference_pairs_sensor(task: TaskRef) -> dg.SensorDefinition:
    return dg.sensor(
        name=f"{task.name}_{SENSOR}",
        job_name=preference_tuning_job_name(task.name),
        minimum_interval_seconds=60,  # reads the rating store (SQLite): cheap, but ratings come slowly
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Requests a preference-tuning run of {task.name} when at least feedback.min_new_pairs new "
        "agreed train pairs (agreement rules of lib/agreement.py, golden-set prompts held out) are in the rating "
        "store. run_key = digest of all agreed train pairs.",
    )(bind_task(preference_pairs_sensor, task))
