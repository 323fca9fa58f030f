"""When the monitoring assets refresh: like ``AutomationCondition.eager()``, except that request
logs loaded while a monitoring run is under way bring one more run once it has finished."""

import dagster as dg

AC = dg.AutomationCondition


def eager_with_follow_up() -> dg.AutomationCondition:
    """``eager()`` with one change: a dependency update counts as handled when the asset is
    requested after it, not when the asset is next updated.

    ``eager()`` resets on the asset's own materialization. A request log loaded while a drift run
    of the same day is in progress is then "handled" by that run's completion, although the run
    read the log before the load: the newest materialization misses the last requests until the
    next load. Here the reset is the tick after a request (``newly_requested``) on which no
    dependency updated; a dependency update seen on that tick may have landed after the run read
    its inputs, so it stays pending and brings one follow-up run (at worst a redundant one).
    The follow-up's own request resets it: no further runs until the next update. A
    materialization nobody requested (a run launched by hand) does not handle an update either.

    Everything else is eager's: missing partitions, the latest time window only, nothing while
    the asset or a dependency is in progress or a dependency is missing. ``.ignore(...)`` on the
    result reaches every dependency condition, the reset's included.
    """
    deps_updated = AC.any_deps_updated()
    handled = ((AC.newly_requested() & ~deps_updated) | AC.initial_evaluation()).with_label(
        "handled_by_a_request")
    return (
        AC.in_latest_time_window()
        & (AC.newly_missing().since_last_handled() | deps_updated.since(handled))
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("eager_with_follow_up")
