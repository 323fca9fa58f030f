"""Resumable LoRA training on the tiny random Llama: a run killed with SIGKILL, a damaged
checkpoint, a finished run and foreign checkpoints, each against an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from resume_worker import DATA_DIGEST, examples, train_config

from genops_assets.lib.training import (
    COMPLETE_MARKER,
    RESUME_FILE,
    ResumeMismatchError,
    SftExample,
    checkpoint_problem,
    train_lora,
)

pytestmark = pytest.mark.server

WORKER = Path(__file__).resolve().parent / "resume_worker.py"
ATOL = 1e-5


def _weights(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def max_abs_diff(a_dir: Path, b_dir: Path) -> float:
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def losses(history: list[dict[str, float]]) -> dict[int, float]:
    return {int(h["step"]): h["loss"] for h in history if "loss" in h}


def train(model_dir: Path, root: Path, **kw):
    tr, val = examples()
    messages: list[str] = []
    result = train_lora(model_dir, tr, val, train_config(), root / "adapter", root / "work",
                        data_digest=kw.pop("data_digest", DATA_DIGEST), on_message=messages.append, **kw)
    return result, messages


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted run: its weights, losses and final checkpoints are what resumed runs must match."""
    root = tmp_path_factory.mktemp("reference")
    result, messages = train(tiny_model_dir, root)
    assert result.resumed_from_step is None and result.steps == 8 and not messages
    return root, result


def test_validation_runs_once_per_eval_step(reference, tiny_model_dir, tmp_path):
    _, result = reference
    # eval_every=4 over 8 steps: the Trainer evaluates at 4 and 8; the last step is not evaluated twice.
    assert [int(h["step"]) for h in result.history if "eval_loss" in h] == [4, 8]
    # eval_every=0: only the final evaluation.
    tr, val = examples()
    cfg = dataclasses.replace(train_config(), eval_every=0, max_steps=2, save_every=2)
    other = train_lora(tiny_model_dir, tr, val, cfg, tmp_path / "adapter", tmp_path / "work", data_digest=DATA_DIGEST)
    assert [int(h["step"]) for h in other.history if "eval_loss" in h] == [2]


def copy_work(reference_root: Path, dest: Path) -> Path:
    shutil.copytree(reference_root / "work", dest / "work")
    return dest / "work" / "checkpoints"


def test_uninterrupted_run_leaves_marked_checkpoints(reference):
    root, result = reference
    ckpts = root / "work" / "checkpoints"
    # save_every=2 over 8 steps, two kept: the last two, each with a valid completion marker.
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    for p in ckpts.iterdir():
        assert checkpoint_problem(p) is None
        marker = json.loads((p / COMPLETE_MARKER).read_text())
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                "rng_state.pth"} <= set(marker["files"])
    recorded = json.loads((root / "work" / RESUME_FILE).read_text())
    assert recorded["data_digest"] == DATA_DIGEST and recorded["config"]["max_steps"] == 8
    assert sorted(losses(result.history)) == list(range(1, 9))
    # The last two steps move the weights by far more than ATOL, so matching them is not trivial.
    assert max_abs_diff(ckpts / "checkpoint-6", root / "adapter") > 100 * ATOL


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_model_dir, reference):
    ref_root, ref = reference
    work = tmp_path / "work"
    marker = work / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(tiny_model_dir), str(work),
                                 str(tmp_path / "adapter"), "4"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"training process exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, "checkpoint-4 never got its completion marker"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "adapter").exists()

    result, messages = train(tiny_model_dir, tmp_path)
    assert result.resumed_from_step == 4 and result.steps == 8
    assert "resuming from checkpoint-4 (step 4/8)" in messages
    # Steps 1-4 come from the checkpoint's log, 5-8 were trained here; all match the reference.
    got, want = losses(result.history), losses(ref.history)
    assert sorted(got) == list(range(1, 9))
    assert got == pytest.approx(want, abs=1e-5)
    diff = max_abs_diff(tmp_path / "adapter", ref_root / "adapter")
    print(f"killed at step 4 and resumed: max abs adapter weight difference {diff:.3g}")
    assert diff <= ATOL


@pytest.mark.parametrize("damage", ["no_marker", "truncated_optimizer"])
def test_incomplete_checkpoint_is_skipped(tmp_path, tiny_model_dir, reference, damage):
    ref_root, _ = reference
    ckpts = copy_work(ref_root, tmp_path)
    last = ckpts / "checkpoint-8"
    if damage == "no_marker":  # killed while the Trainer was still writing checkpoint-8
        (last / COMPLETE_MARKER).unlink()
        reason = "no completion marker"
    else:  # marker present, but a file lost its tail afterwards (disk full, copy cut short)
        data = (last / "optimizer.pt").read_bytes()
        (last / "optimizer.pt").write_bytes(data[: len(data) // 2])
        reason = "optimizer.pt does not match its recorded sha256"

    result, messages = train(tiny_model_dir, tmp_path)
    assert any(m.startswith("skipped checkpoint-8: " + reason) and m.endswith("removed") for m in messages), messages
    assert result.resumed_from_step == 6 and result.steps == 8
    assert result.skipped_checkpoints == [m for m in messages if m.startswith("skipped")]
    assert checkpoint_problem(last) is None  # written again by the resumed run
    diff = max_abs_diff(tmp_path / "adapter", ref_root / "adapter")
    print(f"{damage}: resumed from checkpoint-6, max abs adapter weight difference {diff:.3g}")
    assert diff <= ATOL


def test_finished_run_is_not_trained_again(tmp_path, tiny_model_dir, reference):
    ref_root, _ = reference
    copy_work(ref_root, tmp_path)
    result, messages = train(tiny_model_dir, tmp_path)
    assert "resuming from checkpoint-8 (step 8/8)" in messages
    assert result.resumed_from_step == 8 and result.steps == 8
    assert max(losses(result.history)) == 8
    assert max_abs_diff(tmp_path / "adapter", ref_root / "adapter") <= ATOL


def test_checkpoints_of_other_inputs_are_refused(tmp_path, tiny_model_dir, reference):
    ref_root, _ = reference
    ckpts = copy_work(ref_root, tmp_path)
    expected = rf"data_digest: checkpoints '{DATA_DIGEST}', this run 'other'"
    with pytest.raises(ResumeMismatchError, match=expected) as err:
        train(tiny_model_dir, tmp_path, data_digest="other")
    assert f"delete {ckpts}" in str(err.value) and "resume=False" in str(err.value)

    tr, val = examples()
    tr[3] = SftExample(tr[3].example_id, tr[3].messages, '{"category": "other"}')
    with pytest.raises(ResumeMismatchError, match=r"examples_digest: checkpoints '[0-9a-f]{64}', this run"):
        train_lora(tiny_model_dir, tr, val, train_config(), tmp_path / "adapter", tmp_path / "work",
                   data_digest=DATA_DIGEST)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-6", "checkpoint-8"]  # nothing deleted

    # resume=False discards them and trains from step 0 on the new digest.
    result, messages = train(tiny_model_dir, tmp_path, data_digest="other", resume=False)
    assert result.resumed_from_step is None and result.steps == 8
    assert any(m.startswith("resume=False: removing") for m in messages)
    assert json.loads((tmp_path / "work" / RESUME_FILE).read_text())["data_digest"] == "other"
    assert max_abs_diff(tmp_path / "adapter", ref_root / "adapter") <= ATOL
