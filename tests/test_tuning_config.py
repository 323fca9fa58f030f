"""The tuning step's Dagster config and the training library agree on every default."""

from __future__ import annotations

import dataclasses

from genops_assets.defs.tuning.config import TuningConfig
from genops_assets.lib.training import LoraTrainConfig


def test_default_config_trains_as_the_library_default():
    cfg = TuningConfig().to_train_config()
    assert cfg == LoraTrainConfig()
    # what a default run of tuned_adapter has always trained with
    assert (cfg.max_steps, cfg.eval_every, cfg.save_every, cfg.rank, cfg.alpha) == (100, 50, 50, 16, 32)


def test_every_knob_reaches_the_library():
    changed = TuningConfig(rank=4, alpha=8, target_modules=["q_proj"], max_steps=7, eval_every=0, save_every=3,
                           bf16=True, deepspeed_config="ds.json").to_train_config()
    assert changed == dataclasses.replace(LoraTrainConfig(), rank=4, alpha=8, target_modules=("q_proj",), max_steps=7,
                                          eval_every=0, save_every=3, bf16=True, deepspeed_config="ds.json")
    # every library knob but weight decay is a config field
    lib_fields = {f.name for f in dataclasses.fields(LoraTrainConfig)}
    assert lib_fields - set(TuningConfig.model_fields) == {"weight_decay"}
