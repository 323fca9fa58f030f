"""A LoRA training process for the resume tests: the same examples and config as the tests,
run as its own process so that a test can kill it with SIGKILL.

Usage: python resume_worker.py MODEL_DIR WORK_DIR ADAPTER_DIR STALL_AFTER_STEP

After logging the first training step past STALL_AFTER_STEP it stops making progress, so the
test can kill it at a known point (the checkpoint of STALL_AFTER_STEP has been written by then).
"""

from __future__ import annotations

import sys
import time

from genops_assets.lib.training import LoraTrainConfig, SftExample, train_lora

DATA_DIGEST = "tiny-support-v1"
_CATEGORIES = ("billing", "shipping", "account", "bug")
_THINGS = ("invoice", "parcel", "password", "app", "refund", "login", "order", "screen")


def examples(n_train: int = 20, n_validation: int = 4) -> tuple[list[SftExample], list[SftExample]]:
    def one(i: int) -> SftExample:
        thing = _THINGS[i % len(_THINGS)]
        messages = [
            {"role": "system", "content": "Classify the support ticket. Answer with JSON."},
            {"role": "user", "content": f"Ticket {i}: my {thing} has a problem since {i % 7 + 1} days."},
        ]
        return SftExample(f"ex-{i:03d}", messages, f'{{"category": "{_CATEGORIES[i % len(_CATEGORIES)]}"}}')

    return [one(i) for i in range(n_train)], [one(1000 + i) for i in range(n_validation)]


def train_config() -> LoraTrainConfig:
    # 20 examples / batch 4 = 5 steps per epoch: step 4 is mid-epoch, step 6 is in the second.
    return LoraTrainConfig(rank=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj"), learning_rate=5e-3,
                           max_steps=8, max_length=128, batch_size=4, warmup_steps=2, seed=7, eval_every=4,
                           save_every=2, log_every=1)


def main(argv: list[str]) -> None:
    model_dir, work_dir, adapter_dir, stall_after = argv[0], argv[1], argv[2], int(argv[3])

    def on_progress(rec: dict[str, float]) -> None:
        if "loss" in rec and rec["step"] > stall_after:
            print(f"stalled at step {int(rec['step'])}", flush=True)
            time.sleep(3600)

    train, validation = examples()
    train_lora(model_dir, train, validation, train_config(), adapter_dir, work_dir, on_progress,
               data_digest=DATA_DIGEST)


if __name__ == "__main__":
    main(sys.argv[1:])
