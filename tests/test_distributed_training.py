"""Multi-process training under ``accelerate launch``, on what this machine has (CPUs, gloo), and
the shipped launcher configs.

Data parallel: 2 processes of per-device batch 2 see the same global batches as one process of
batch 4, so they must train the same adapter (up to float reduction order); their checkpoints
hold one RNG state per rank and resume to the same weights. DeepSpeed and FSDP need GPUs here:
their configs are validated by accelerate's own config classes and DeepSpeed's config parser.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml
from resume_worker import DATA_DIGEST, examples, train_config
from test_pipes_training import train_through_pipes, write_request
from test_resume import losses, max_abs_diff

from genops_assets.lib.training import COMPLETE_MARKER, checkpoint_problem, train_lora
from resources.trainer import LAUNCHER_DIR, SubprocessTrainer

REPO = Path(__file__).resolve().parents[1]
# Dropout off: each rank draws its own dropout masks, so with dropout the two runs would differ
# by design, not by a bug.
DP = {"dropout": 0.0, "max_steps": 4, "save_every": 2, "eval_every": 2, "log_every": 1}
DP_TOLERANCE = 2e-5  # float32 sums in another order; the weights move by far more (checked)
LAUNCHERS = {"ddp_cpu.yaml": "MULTI_GPU", "ddp_gpu.yaml": "MULTI_GPU", "zero2.yaml": "DEEPSPEED",
             "zero3.yaml": "DEEPSPEED", "fsdp.yaml": "FSDP"}


def test_every_launcher_config_loads_in_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    assert sorted(p.name for p in LAUNCHER_DIR.glob("*.yaml")) == sorted(LAUNCHERS)
    for name, kind in LAUNCHERS.items():
        config = load_config_from_file(str(LAUNCHER_DIR / name))
        assert isinstance(config, ClusterConfig) and config.distributed_type.value == kind, name
        assert config.num_machines == 1 and config.rdzv_backend == "static"
        assert config.use_cpu is (name == "ddp_cpu.yaml"), name


@pytest.mark.parametrize("name,stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_deepspeed_configs_pass_accelerate_and_deepspeed(name, stage):
    """The accelerate config names a DeepSpeed JSON whose "auto" values the Trainer fills; with
    those filled, accelerate's DeepSpeed plugin and DeepSpeed's own config parser accept it."""
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    launcher = yaml.safe_load((LAUNCHER_DIR / name).read_text())
    ds_file = REPO / launcher["deepspeed_config"]["deepspeed_config_file"]  # relative to the launch folder
    plugin = DeepSpeedPlugin(hf_ds_config=str(ds_file), zero3_init_flag=launcher["deepspeed_config"]["zero3_init_flag"])
    assert plugin.zero_stage == stage
    # What the HF Trainer writes into the "auto" fields for batch 4, 1 accumulation step; outside
    # a process group DeepSpeed's parser counts one rank.
    filled = json.loads(ds_file.read_text())
    filled.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, train_batch_size=4,
                  gradient_clipping=1.0, bf16={"enabled": True})
    filled["zero_optimization"] = {k: (5_000_000 if v == "auto" else v) for k, v in filled["zero_optimization"].items()}
    parsed = DeepSpeedConfig(filled)  # raises on an inconsistent or unknown setting
    assert parsed.zero_optimization_stage == stage and parsed.train_batch_size == 4 and parsed.bfloat16_config.enabled
    with pytest.raises(AssertionError, match="Check batch related parameters"):
        DeepSpeedConfig({**filled, "train_batch_size": 7})


def launch_env(name: str, prepare) -> dict[str, str]:
    """The environment ``accelerate launch --config_file <name> --num_processes 2`` gives each
    process (accelerate's own argument checks and config merge; nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(LAUNCHER_DIR / name), "--num_processes", "2",
                                               "--main_process_port", "0", "-m", "genops_assets.lib.train_entry"])
    args, defaults, _ = _validate_launch_command(args)
    # as accelerate's launch_command does before it starts DeepSpeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    env = prepare(args)
    return env[1] if isinstance(env, tuple) else env


def test_fsdp_config_builds_accelerates_plugin(monkeypatch):
    """The FSDP launcher config, through accelerate's launcher, gives an FSDP plugin with sharded
    checkpoints and decoder layers as the wrapping unit."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    env = launch_env("fsdp.yaml", prepare_multi_gpu_env)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    import torch

    if not torch.cuda.is_available():
        # Loading the base on rank 0 and broadcasting it (sync_module_states) needs a device:
        # the shipped config is for GPUs, and here the plugin says so; the rest is checked below.
        with pytest.raises(RuntimeError, match="no available devices"):
            FullyShardedDataParallelPlugin()
        monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


@pytest.mark.parametrize("name,stage", [("zero2.yaml", "2"), ("zero3.yaml", "3")])
def test_deepspeed_launch_environment(name, stage):
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    env = launch_env(name, prepare_deepspeed_cmd_env)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"deploy/accelerate/deepspeed_zero{stage}.json"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    """One process, batch 4: the global batch the 2-process run must reproduce."""
    root = tmp_path_factory.mktemp("one-process")
    tr, val = examples()
    cfg = dataclasses.replace(train_config(), batch_size=4, **DP)
    result = train_lora(tiny_model_dir, tr, val, cfg, root / "adapter", root / "work", data_digest=DATA_DIGEST)
    return root, result


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_model_dir):
    """Two gloo processes under accelerate launch through Pipes, batch 2 each."""
    root = tmp_path_factory.mktemp("two-processes")
    request = write_request(tiny_model_dir, root, batch_size=2, **DP)
    trainer = SubprocessTrainer(launcher="ddp_cpu.yaml", num_processes=2)
    return root, request, trainer, train_through_pipes(request, trainer)[0]


@pytest.mark.server
def test_two_cpu_processes_train_the_adapter_of_one(one_process, two_processes):
    one_root, one = one_process
    two_root, _, _, two = two_processes
    assert two.steps == one.steps == 4 and two.train_examples == one.train_examples == 20
    moved = max_abs_diff(one_root / "work" / "checkpoints" / "checkpoint-2", one_root / "adapter")
    diff = max_abs_diff(two_root / "adapter", one_root / "adapter")
    print(f"2 processes x batch 2 vs 1 process x batch 4: max abs adapter difference {diff:.3g} "
          f"(the last 2 steps moved the weights by {moved:.3g})")
    assert diff <= DP_TOLERANCE < moved / 100
    assert losses(two.history) == pytest.approx(losses(one.history), abs=1e-4)
    evals = [h["eval_loss"] for h in two.history if "eval_loss" in h]
    assert evals == pytest.approx([h["eval_loss"] for h in one.history if "eval_loss" in h], abs=1e-4)


@pytest.mark.server
def test_data_parallel_checkpoints_keep_every_rank_and_resume(two_processes):
    root, request, trainer, two = two_processes
    ckpts = root / "work" / "checkpoints"
    for ckpt in ckpts.iterdir():
        assert checkpoint_problem(ckpt) is None
        recorded = json.loads((ckpt / COMPLETE_MARKER).read_text())["files"]
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= set(recorded)
    # As after a kill at step 3: the last checkpoint and the adapter never written.
    reference = root / "adapter-uninterrupted"
    shutil.copytree(root / "adapter", reference)
    shutil.rmtree(ckpts / "checkpoint-4")
    shutil.rmtree(root / "adapter")
    resumed, lines = train_through_pipes(request, trainer)
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    assert "resuming from checkpoint-2 (step 2/4)" in lines
    assert losses(resumed.history) == pytest.approx(losses(two.history), abs=1e-6)
    assert max_abs_diff(root / "adapter", reference) <= 1e-6


def fsdp_sharded_checkpoint(root: Path, step: int, ranks: int = 2) -> Path:
    """A checkpoint folder laid out as the Trainer saves one under FSDP with SHARDED_STATE_DICT:
    weights and optimizer as one shard per rank with their index, one RNG state per rank."""
    ckpt = root / f"checkpoint-{step}"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        (ckpt / folder).mkdir(parents=True)
        (ckpt / folder / ".metadata").write_bytes(b"index of the shards")
        for rank in range(ranks):
            (ckpt / folder / f"__{rank}_0.distcp").write_bytes(f"{folder} shard {rank}".encode())
    for rank in range(ranks):
        (ckpt / f"rng_state_{rank}.pth").write_bytes(b"rng")
    (ckpt / "scheduler.pt").write_bytes(b"scheduler")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return ckpt


def test_fsdp_sharded_checkpoints_are_recognised_and_verified(tmp_path):
    """FSDP runs on GPUs only (accelerate applies it to multi-GPU process groups), so its sharded
    layout is built here by hand: complete with its shard indexes recorded, incomplete without."""
    from genops_assets.lib.training import find_resume_checkpoint, write_checkpoint_marker

    ckpt = fsdp_sharded_checkpoint(tmp_path, 4)
    write_checkpoint_marker(ckpt, 4)
    recorded = json.loads((ckpt / COMPLETE_MARKER).read_text())["files"]
    assert {"pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata", "optimizer_0/__1_0.distcp"} <= set(recorded)
    assert checkpoint_problem(ckpt) is None
    (ckpt / "optimizer_0" / "__1_0.distcp").write_bytes(b"cut")
    assert "optimizer_0/__1_0.distcp does not match its recorded sha256" in checkpoint_problem(ckpt)

    # Killed before the optimizer's shards were indexed: not resumable, skipped for the one before.
    older = fsdp_sharded_checkpoint(tmp_path, 2)
    write_checkpoint_marker(older, 2)
    newer = fsdp_sharded_checkpoint(tmp_path, 6)
    (newer / "optimizer_0" / ".metadata").unlink()
    write_checkpoint_marker(newer, 6)
    assert checkpoint_problem(newer) == "missing optimizer.pt"
    shutil.rmtree(ckpt)
    chosen, skipped = find_resume_checkpoint(tmp_path)
    assert chosen == older and skipped == ["skipped checkpoint-6: missing optimizer.pt; removed"]


@pytest.mark.server
def test_killing_the_launcher_ends_every_rank(tmp_path, tiny_model_dir):
    """kill -9 of the accelerate launcher (the process Pipes started) takes its ranks with it, so
    none goes on writing checkpoints beside the retry."""
    import psutil
    from test_pipes_training import until_stalled

    request = write_request(tiny_model_dir, tmp_path, batch_size=2, **DP)
    with (dg.DagsterInstance.ephemeral() as instance,
          until_stalled(request, tmp_path, 1, instance, launcher="ddp_cpu.yaml", num_processes=2) as (pid, outcome)):
        launcher = psutil.Process(pid).parent()
        ranks = launcher.children()
        assert len(ranks) == 2 and "accelerate.commands.launch" in launcher.cmdline()
        launcher.kill()
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, f"ranks left running after the launcher was killed: {alive}"
    assert not outcome["result"].success
