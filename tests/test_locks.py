"""The lock helper: one holder at a time, a waiter is told, a released lock is free again."""

from __future__ import annotations

import threading
import time

from genops_assets.lib.locks import exclusive


def test_second_holder_waits_for_the_first_and_is_told(tmp_path):
    lock = tmp_path / "sub" / "work.lock"
    held, events, messages = threading.Event(), [], []

    def first():
        with exclusive(lock):
            held.set()
            events.append("first in")
            time.sleep(0.3)
            events.append("first out")

    t = threading.Thread(target=first)
    t.start()
    held.wait(5)
    with exclusive(lock, on_wait=messages.append) as waited_s:
        events.append("second in")
    t.join()
    assert events == ["first in", "first out", "second in"]
    assert waited_s > 0.1 and len(messages) == 1 and str(lock) in messages[0]


def test_free_lock_is_taken_without_waiting(tmp_path):
    messages = []
    for _ in range(2):  # released after the block: taken again at once
        with exclusive(tmp_path / "work.lock", on_wait=messages.append) as waited_s:
            assert waited_s < 0.05
    assert messages == []
