"""The real trainer on CPU ranks (torchrun, DeepSpeed): resume after a killed rank, skip a corrupted checkpoint,
every method and stage (and one rank, the default here) passes the reload check, and ranks never outlive the task
that launched them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import wait_for
from nightshift.training import checkpoints
from nightshift.training.launch import free_port
from nightshift.training.verify import verify_output
from trainer_runs import run_trainer, tiny_recipe, trainer_config

RESUMABLE = dict(train_steps=8, checkpoint_interval=2, keep_checkpoints=2)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_model, train_blocks):
    """An uninterrupted run, and a run whose rank 1 was SIGKILLed at step 7 (after the step-6 checkpoint)."""
    root = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(**RESUMABLE)
    straight = run_trainer(root / "straight", tiny_model, train_blocks, recipe)
    killed = root / "killed"
    with pytest.raises(RuntimeError, match="trainer exited with code"):
        run_trainer(killed, tiny_model, train_blocks, recipe, fault="trainer.rank1.step7")
    return straight, killed, recipe


@pytest.mark.e2e
def test_a_rank_killed_after_a_checkpoint_resumes_there_and_ends_with_the_same_losses(killed_run, tiny_model,
                                                                                       train_blocks):
    straight, killed, recipe = killed_run
    assert not (killed / "candidate" / "metrics.json").exists()
    assert [c.tag for c in checkpoints.complete(killed / "checkpoints")] == ["step-00000006", "step-00000004"]

    resumed = run_trainer(killed, tiny_model, train_blocks, recipe)

    log = (killed / "trainer.log").read_text()
    assert "exitcode: -9" in log  # the launcher saw rank 1 die by SIGKILL
    assert "resuming from checkpoint step-00000006" in log
    assert resumed["resumed_from"] == 6
    assert len(resumed["losses"]) == 8
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-6, rel=0)
    assert resumed["reload_check"]["loss"] == pytest.approx(straight["reload_check"]["loss"], abs=1e-6, rel=0)
    verify_output(killed / "candidate")  # raises ReloadCheckFailed with its reason


@pytest.mark.e2e
def test_a_corrupted_newest_checkpoint_is_skipped_and_a_half_written_one_ignored(killed_run, tiny_model,
                                                                                  train_blocks):
    straight, killed, recipe = killed_run
    root = killed / "checkpoints"
    newest = root / "step-00000006"
    optim = sorted(newest.glob("zero_pp_rank_1_*optim_states.pt"))[0]
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    optim.write_bytes(bytes(data))
    half = root / "step-00000007"  # a save killed before its manifest was written
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")

    resumed = run_trainer(killed, tiny_model, train_blocks, recipe)

    log = (killed / "trainer.log").read_text()
    assert f"skipping checkpoint step-00000006: {optim.name} does not match its checksum" in log
    assert "resuming from checkpoint step-00000004" in log
    assert "step-00000007" not in log.split("skipping checkpoint step-00000006")[-1].split("resuming")[0]
    assert resumed["resumed_from"] == 4
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-6, rel=0)


def check_trained(out: Path, recipe, base: Path, method: str) -> None:
    """The run learned, its checkpoint reloads to the trainer's loss, and it is a plain model of the base's shape."""
    metrics = json.loads((out / "candidate" / "metrics.json").read_text())
    assert metrics["method"] == method and not metrics["diverged"]
    assert metrics["losses"][-1] < metrics["losses"][0] - 0.01  # it learned something
    assert all(h["grad_norm"] is not None and h["grad_norm"] > 0 for h in metrics["history"])

    # In this process: the fresh-process path of the same check is tests/training/test_verify.py's.
    result = verify_output(out / "candidate")
    assert result.tolerance == recipe.reload_tolerance_for(metrics["precision"])  # bf16 rounding allowed for
    assert result.difference <= result.tolerance

    checkpoint = out / "candidate" / "checkpoint"
    with safe_open(checkpoint / "model.safetensors", "pt") as trained, \
            safe_open(base / "model.safetensors", "pt") as original:
        assert set(trained.keys()) == set(original.keys())  # a plain model: LoRA merged, nothing missing or extra
        changed = [k for k in original.keys() if not (trained.get_tensor(k) == original.get_tensor(k)).all()]
    assert changed, "the saved weights are the base model's"
    if method == "lora":  # only the adapted projections moved
        assert all(k.endswith("proj.weight") for k in changed)
    assert json.loads((checkpoint / "config.json").read_text())["use_cache"] is True
    assert (checkpoint / "tokenizer.json").is_file()


@pytest.mark.parametrize(("method", "stage", "ranks", "extra"), [
    # fp32 ZeRO-2 on two ranks: the resume tests above; ZeRO-3 with recomputed activations: the next test.
    ("full", 2, 1, {}),  # one rank, the default on a machine without GPUs: ZeRO off, every core
    ("full", 2, 2, {"precision": "bf16"}),  # the recipe's fp32 tolerance; bf16 is checked to 1e-2
    ("lora", 2, 2, {"gradient_accumulation_steps": 2}),
    ("lora", 3, 2, {}),
])
def test_each_method_and_zero_stage_trains_and_passes_the_reload_check(tmp_path, tiny_model, train_blocks, method,
                                                                      stage, ranks, extra):
    recipe = tiny_recipe(method=method, zero_stage=stage, checkpoint_interval=0,
                         **({"learning_rate": 1e-2} if method == "lora" else {}), **extra)
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    metrics = run_trainer(tmp_path, tiny_model, train_blocks, recipe, ranks=ranks)
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before  # no RAM left behind
    assert metrics["world_size"] == ranks and metrics["zero_stage"] == (0 if ranks == 1 else stage)
    log = (tmp_path / "trainer.log").read_text()
    if ranks == 1:
        threads = os.sched_getaffinity(0)
        assert "ZeRO off: one rank" in log and f"1 rank (cpu, {len(threads)} threads each)" in log
    check_trained(tmp_path, recipe, tiny_model, method)


@pytest.mark.e2e
def test_zero3_through_shared_memory_trains_exactly_as_through_gloo(tmp_path, tiny_model, train_blocks, monkeypatch):
    """ZeRO-3 gathers parameters in place and reduces in buckets: the shared-memory route must not change a bit.

    (ZeRO-2 is compared the same way by the two-node test: two one-rank nodes use gloo, one node shared memory.)
    The run recomputes activations, and its checkpoint must pass the reload check like every method's above.
    """
    recipe = tiny_recipe(zero_stage=3, checkpoint_interval=0, gradient_checkpointing=True)
    shared = run_trainer(tmp_path / "shm", tiny_model, train_blocks, recipe)
    assert "all-reduce and all-gather through shared memory" in (tmp_path / "shm" / "trainer.log").read_text()
    monkeypatch.setenv("NIGHTSHIFT_CPU_SHM_COLLECTIVES", "0")
    gloo = run_trainer(tmp_path / "gloo", tiny_model, train_blocks, recipe)
    assert "through shared memory" not in (tmp_path / "gloo" / "trainer.log").read_text()
    assert shared["losses"] == pytest.approx(gloo["losses"], abs=1e-6, rel=0)
    assert shared["reload_check"]["loss"] == pytest.approx(gloo["reload_check"]["loss"], abs=1e-6, rel=0)
    assert shared["zero_stage"] == 3
    check_trained(tmp_path / "shm", recipe, tiny_model, "full")


@pytest.mark.e2e
@pytest.mark.parametrize("killed", ["task", "launcher"])
def test_ranks_stop_when_the_task_or_the_launcher_is_killed_outright(tmp_path, tiny_model, train_blocks, killed):
    """SIGKILL of the task (as the supervisor does when a task marked failed ignores SIGTERM) while the ranks train,
    or of torchrun while they are still starting (before any of them could rendezvous): no rank lives on, the task
    returns (an error, not a hang), and no shared memory is left behind."""
    recipe = tiny_recipe(train_steps=100_000, checkpoint_interval=0)
    config = trainer_config(tmp_path, tiny_model, train_blocks, recipe)
    port = free_port()
    task = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path;"
        "from nightshift.training.launch import launch_command, local_env, run_local;"
        "run_local(launch_command(Path(sys.argv[1]), 2, int(sys.argv[3])), local_env(), Path(sys.argv[2]))"
    ), str(config), str(tmp_path / "trainer.log"), str(port)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    def processes(kind: str) -> list[int]:
        out = subprocess.run(["pgrep", "-f", "--", f"--config {config}"], capture_output=True, text=True).stdout
        pids = [int(p) for p in out.split() if int(p) != task.pid]
        launchers = [p for p in pids if "torchrun" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        return launchers if kind == "launcher" else [p for p in pids if p not in launchers] if kind == "rank" else pids

    if killed == "task":
        wait_for(lambda: "step 1/100000" in (tmp_path / "trainer.log").read_text()
                 if (tmp_path / "trainer.log").exists() else False, timeout=240, what="training to start")
        assert len(processes("rank")) == 2
        task.send_signal(signal.SIGKILL)
        task.wait()
    else:
        wait_for(lambda: len(processes("rank")) == 2, timeout=60, what="the ranks to start", every=0.05)
        (launcher,) = processes("launcher")
        os.kill(launcher, signal.SIGKILL)
        assert task.wait(timeout=60) == 1  # run_local raised: the launcher died; it did not wait for the ranks
    wait_for(lambda: not processes("all"), timeout=30, what="every rank to stop")
    time.sleep(0.5)
    assert processes("all") == []
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
