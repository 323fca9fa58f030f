"""The endpoint's request log, at the boundary between serving and the warehouse."""

import dagster as dg

from resources.paths import GenopsHome


@dg.sensor(
    job_name="ingest_requests",
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Loads new lines of the endpoint's request log into the feedback store. The monitoring "
    "assets downstream of request_log follow through declarative automation.",
)
def request_log_sensor(context: dg.SensorEvaluationContext, home: GenopsHome):
    path = home.endpoint_dir / "requests.jsonl"
    if not path.exists():
        return dg.SkipReason(f"no request log at {path}")
    size = path.stat().st_size
    last = int(context.cursor or 0)
    if size == last:
        return dg.SkipReason(f"request log unchanged ({size} bytes)")
    # A shorter file was rotated; either way a new size is new work. The asset itself keeps the
    # byte offset it loaded to, so a run that finds nothing new loads nothing twice.
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"requests:{path}:{size}",
                                    tags={"genops/trigger": "request_log", "genops/log_bytes": str(size)})],
        cursor=str(size),
    )
