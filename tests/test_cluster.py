"""From one box to a cluster, simulated on one machine with gloo on the CPU: two processes stop together when a
signal reaches one of them or the launcher; a run resumed on another number of processes with the same global
batch continues the same global sample stream (2 processes -> 1 -> 2); two "nodes" (two launches of torchrun
--nnodes 2, or accelerate launch --num_machines 2, on 127.0.0.1) train exactly like one node with two processes,
and the 50k sampler across two nodes writes the bytes of one process.

The launches take seconds each: `python -m pytest -m cluster tests/test_cluster.py` runs them (opt-in). By default:
the global batch's arithmetic, the data stream, and two processes stopped by a signal to one of them.
"""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_reliability import SAMPLE, run
from test_reliability import sampled, weights  # noqa: F401  (fixtures: the tiny weights, the one-process .npz)
from test_reliability import TRAIN as RELIABILITY_TRAIN
from utils.config import load_config
from utils.data.loader import ResumableSampler
from utils.errors import ConfigError, OutputError
from utils.files import check_shared
from utils.preemption import STOPPED_EXIT_CODE
from utils.training.batch_plan import BatchPlan, batch_plan

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# 20 steps of a tiny reAR on the toy set; noise and class dropout off, so that runs that split the global batch
# differently agree up to float order (two nodes x one process and one node x two are the same ranks: exactly)
TRAIN = (
    "config=configs/rear_toy.yaml experiment.output_dir={O} model.generator.hidden_size=32 "
    "model.generator.num_hidden_layers=2 model.generator.num_attention_heads=2 model.generator.intermediate_size=64 "
    "model.generator.decode_align_layer_idx=1 model.generator.projection_dim=32 dataset.toy.num_images=256 "
    "model.generator.perturb_mode=none model.generator.class_label_dropout=0.0 training.per_gpu_batch_size=4 "
    "sampling.num_samples=10 training.max_train_steps=20 lr_scheduler.params.warmup_steps=5 experiment.save_every=10 "
    "experiment.generate_every=100 experiment.log_every=5"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arguments(template: str, out, weights_dir="") -> list:
    return shlex.split(template.replace("{O}", str(out)).replace("{W}", str(weights_dir)))


def launch(launcher: list, script: str, args: list, faults=(), timeout=300) -> subprocess.CompletedProcess:
    """`launcher script args` with `faults` (tests/with_faults.py) in the processes it starts."""
    env = {**ENV, "REAR_TEST_FAULTS": json.dumps(list(faults))}
    command = [*launcher, str(ROOT / "tests" / "with_faults.py"), str(ROOT / script), *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def launch_nodes(launchers: list, script: str, args: list, timeout=300) -> list:
    """One launch per simulated node, all at once (they meet at the rendezvous)."""
    processes = [subprocess.Popen([*launcher, str(ROOT / script), *args], env=ENV, cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for launcher in launchers]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout), *p.communicate()) for p in processes]


def two_processes(*options) -> list:
    return [*TORCHRUN, *options, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def weights_of(out) -> dict:
    return load_file(Path(out) / "generator.safetensors")


def assert_same_weights(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


# ------------------------------------------------------------------------------------------- the global batch
@pytest.mark.parametrize("config, processes, split", [
    ("rear_s", 8, (256, 1)), ("rear_s", 16, (128, 1)), ("rear_s", 1, (256, 8)), ("rear_s", 3 * 8, None),
    ("rear_b", 8, (128, 2)), ("rear_b", 16, (128, 1)), ("rear_b", 32, (64, 1)), ("rear_l", 4, (128, 4)),
])
def test_the_released_global_batch_on_any_number_of_gpus(config, processes, split):
    training = load_config(str(ROOT / "configs" / f"{config}.yaml")).training
    assert training.global_batch_size == 2048  # as the paper's models were trained
    if split is None:
        with pytest.raises(ConfigError, match=r"^training.global_batch_size 2048 does not divide among 24 processes: "
                                              r"choose a global batch that is a multiple of the number of processes "
                                              r"\(e.g. 2040\), or another number of processes$"):
            batch_plan(training, processes)
        return
    plan = batch_plan(training, processes)
    assert (plan.per_gpu, plan.accumulation) == split and plan.global_batch == 2048


def test_without_a_global_batch_the_config_split_grows_with_the_processes():
    training = load_config(str(ROOT / "configs" / "rear_b.yaml"), ["training.global_batch_size=null"]).training
    assert batch_plan(training, 16) == BatchPlan(16, 128, 2)
    assert batch_plan(training, 16).describe() == "16 processes x 128 per GPU x 2 accumulation = global batch 4096"
    assert BatchPlan(1, 6, 1).describe() == "1 process x 6 per GPU x 1 accumulation = global batch 6"
    # the fewest micro-batches that fit: 12 samples a process, at most 5 a micro-batch -> 3 x 4, not 2 x 6
    assert batch_plan(load_config(None, ["training.global_batch_size=24", "training.per_gpu_batch_size=5"]).training,
                      2) == BatchPlan(2, 4, 3)


@pytest.mark.parametrize("split", [(2, 4, 1), (1, 4, 2), (4, 1, 2), (1, 8, 1)])
def test_an_optimizer_step_trains_on_the_same_samples_however_the_global_batch_is_split(split):
    """The samples of each optimizer step, over all processes and micro-steps, from stream position 16 (two
    passes of 20 samples: the step that crosses into the second pass too)."""
    processes, per_gpu, accumulation = split

    def steps(processes, per_gpu, accumulation, count=4):
        streams = [iter(ResumableSampler(20, per_gpu, rank, processes, seed=3, start=16)) for rank in range(processes)]
        return [sorted(i for _ in range(accumulation) for stream in streams for i in next(stream))
                for _ in range(count)]

    assert steps(processes, per_gpu, accumulation) == steps(1, 8, 1)


def test_a_resume_with_another_global_batch_says_so(server, tmp_path):
    out = tmp_path / "run"
    assert run(server, RELIABILITY_TRAIN + " training.stop_steps=2", out).returncode == 0
    resumed = run(server, RELIABILITY_TRAIN + " training.per_gpu_batch_size=4", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("warning: the checkpoint was trained at global batch 8, this run's is 4 (1 process x 4 per GPU x 1 "
            "accumulation = global batch 4); set training.global_batch_size=8 to keep it") in resumed.stderr.splitlines()
    same = run(server, RELIABILITY_TRAIN + " training.per_gpu_batch_size=4 training.max_train_steps=8", out)
    assert "warning: the checkpoint" not in same.stderr  # resumed at 4 from its own checkpoint


def test_a_process_that_cannot_see_the_output_folder_says_it_must_be_shared(tmp_path):
    (tmp_path / "config.yaml").write_text("written by process 0")
    check_shared(str(tmp_path / "config.yaml"), 1)
    with pytest.raises(OutputError, match=rf"^process 1 on {socket.gethostname()} does not see {tmp_path}/missing, "
                                          "which process 0 wrote: the output folder must be on a file system that "
                                          "every machine shares$"):
        check_shared(str(tmp_path / "missing"), 1)


# ------------------------------------------------------------------------------------------- launches (opt-in)
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The uninterrupted run on one node with two processes."""
    out = tmp_path_factory.mktemp("two_processes") / "run"
    result = launch(two_processes(), "scripts/train_rear.py", arguments(TRAIN, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x 4 per GPU x 1 accumulation = global batch 8" in result.stdout
    return out


@pytest.mark.parametrize("signal, reason", [
    # rank 0 prints the line; it was not signalled itself (by default: the representative two-process case)
    pytest.param({"rank": 1, "signal": "SIGTERM"}, "a stop signal to another process", id="SIGTERM to one process"),
    pytest.param({"rank": 1, "signal": "SIGUSR1", "to": "launcher"}, "SIGUSR1",
                 id="SIGUSR1 to torchrun, passed on to both", marks=pytest.mark.cluster),
])
def test_two_processes_stop_after_the_same_step_and_resume_exactly(two_process_run, tmp_path, signal, reason):
    out = tmp_path / "run"
    stop = {"target": "utils.training.step:train_step", "action": "signal", "nth": 3, **signal}
    stopped = launch(two_processes("--signals-to-handle=SIGTERM,SIGINT,SIGUSR1"), "scripts/train_rear.py",
                     arguments(TRAIN, out), faults=[stop])
    assert stopped.returncode == 1  # torchrun's own: a worker ended with 75, or torchrun itself was signalled
    assert (f"stopped by {reason} after step 3, saved in {out}/checkpoints/checkpoint-00000003: run the same "
            "command to continue (exit code 75)") in stopped.stderr.splitlines()
    saved = out / "checkpoints" / "checkpoint-00000003"
    assert sorted(os.listdir(saved)) == ["manifest.json", "model.safetensors", "optimizer.pt", "rng_state_0.pt",
                                         "rng_state_1.pt", "scheduler.pt", "train_state.json"]
    resumed = launch(two_processes(), "scripts/train_rear.py", arguments(TRAIN, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved} at step 3 (24 samples)" in resumed.stdout
    assert_same_weights(weights_of(out), weights_of(two_process_run), exact=True)


@pytest.mark.cluster
def test_a_worker_exits_75_under_plain_python(tmp_path):
    """Without a launcher in between, the process's own exit code reaches the scheduler."""
    stop = {"target": "utils.training.step:train_step", "action": "signal", "nth": 2, "signal": "SIGUSR1"}
    result = launch([sys.executable], "scripts/train_rear.py", arguments(TRAIN, tmp_path / "run"), faults=[stop])
    assert result.returncode == STOPPED_EXIT_CODE, result.stderr[-3000:]


@pytest.mark.cluster
def test_a_resume_on_another_number_of_processes_continues_the_global_stream(tmp_path):
    """training.global_batch_size=8: 2 processes x 4 for steps 1-7, 1 process x 4 x 2 accumulation for 8-14,
    2 processes again for 15-20, against 1 process x 8 for all 20 steps."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    common = ["training.global_batch_size=8", "experiment.save_every=7"]
    steps = []
    for launcher, stop in ((two_processes(), 7), ([sys.executable], 14), (two_processes(), 20)):
        result = launch(launcher, "scripts/train_rear.py",
                        arguments(TRAIN, out) + common + [f"training.stop_steps={stop}"])
        assert result.returncode == 0, result.stderr[-3000:]
        steps.append(json.loads((out / "summary.json").read_text()))
        assert ("1 process x 4 per GPU x 2 accumulation" if launcher == [sys.executable] else
                "2 processes x 4 per GPU x 1 accumulation") + " = global batch 8" in result.stdout
    assert [(s["step"], s["samples_seen"]) for s in steps] == [(7, 56), (14, 112), (20, 160)]
    result = launch([sys.executable], "scripts/train_rear.py",
                    arguments(TRAIN, straight) + common + ["training.per_gpu_batch_size=8"])
    assert "1 process x 8 per GPU x 1 accumulation = global batch 8" in result.stdout
    assert_same_weights(weights_of(out), weights_of(straight), exact=False)


@pytest.mark.cluster
def test_a_global_batch_that_does_not_divide_stops_every_process_in_one_line(tmp_path):
    out = tmp_path / "run"
    result = launch(two_processes(), "scripts/train_rear.py", arguments(TRAIN, out) + ["training.global_batch_size=7"])
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # Each process finds it alone; the launcher may end the second before it prints, once the first has failed.
    assert 1 <= len(lines) <= 2 and set(lines) == {
        "error: training.global_batch_size 7 does not divide among 2 processes: choose a global batch that is a "
        "multiple of the number of processes (e.g. 6), or another number of processes"}
    assert not out.exists()


@pytest.mark.cluster
def test_two_nodes_with_torchrun_train_exactly_like_one_node(two_process_run, tmp_path):
    out, port = tmp_path / "run", free_port()
    nodes = [[*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test"] for _ in range(2)]
    results = launch_nodes(nodes, "scripts/train_rear.py", arguments(TRAIN, out))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    assert_same_weights(weights_of(out), weights_of(two_process_run), exact=True)


@pytest.mark.cluster
def test_two_machines_with_accelerate_train_exactly_like_one_node(two_process_run, tmp_path):
    out, port = tmp_path / "run", free_port()
    nodes = [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines=2",
              "--num_processes=2", f"--machine_rank={rank}", "--main_process_ip=127.0.0.1",
              f"--main_process_port={port}", "--mixed_precision=no", "--dynamo_backend=no"] for rank in range(2)]
    results = launch_nodes(nodes, "scripts/train_rear.py", arguments(TRAIN, out))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    assert_same_weights(weights_of(out), weights_of(two_process_run), exact=True)


# An srun stand-in that starts the tasks here: --nodes x --ntasks-per-node processes with SLURM's variables, each
# task's python under tests/with_faults.py (REAR_TEST_FAULTS: the signals SLURM would send); exits with the largest
# exit code, as srun does.
FAKE_SRUN = """#!{python}
import os, subprocess, sys
options = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:4])
command = sys.argv[4:]
command.insert(command.index("python") + 1, {with_faults!r})
tasks = int(options["nodes"]) * int(options["ntasks-per-node"])
processes = [subprocess.Popen(command, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_NTASKS": str(tasks),
             "SLURM_LOCALID": str(i % int(options["ntasks-per-node"]))}}) for i in range(tasks)]
sys.exit(max(p.wait() for p in processes))
"""


@pytest.mark.cluster
def test_a_slurm_job_stopped_by_its_signal_is_requeued_and_the_requeued_job_ends_the_run_exactly(two_process_run,
                                                                                                 tmp_path):
    """scripts_bash/slurm_train.sh on 1 node x 2 GPUs: SLURM's SIGUSR1 (--signal) reaches both processes in step 3;
    they save and exit 75, the job is requeued; the requeued job resumes and ends with the uninterrupted run's
    weights."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    with_faults = str(ROOT / "tests" / "with_faults.py")
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable, with_faults=with_faults))
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> "{log}"\n'
                                      '[ "$1" = show ] && echo 127.0.0.1 || true\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "run"
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NNODES": "1",
           "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(ROOT),
           "MASTER_PORT": str(free_port())}
    job = ["bash", str(ROOT / "scripts_bash" / "slurm_train.sh"), "--config", "configs/rear_toy.yaml",
           "--output_dir", str(out), *arguments(TRAIN, out)[2:]]  # [2:]: the overrides
    signal = {"target": "utils.training.step:train_step", "action": "signal", "nth": 3, "signal": "SIGUSR1"}
    first = subprocess.run(job, env={**env, "REAR_TEST_FAULTS": json.dumps([signal])}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped with its work saved: requeueing job 77 to continue" in first.stdout
    assert log.read_text().splitlines() == ["scontrol show hostnames localhost", "scontrol requeue 77"]
    assert [os.path.basename(p) for p in sorted((out / "checkpoints").iterdir())] == ["checkpoint-00000003"]
    requeued = subprocess.run(job, env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "job 77 (start 1): 1 nodes x 2 GPUs" in requeued.stdout
    assert log.read_text().splitlines()[2:] == ["scontrol show hostnames localhost"]  # no second requeue
    assert_same_weights(weights_of(out), weights_of(two_process_run), exact=True)


# ------------------------------------------------------------------------------------------- the 50k sampler
def sampler_arguments(out, weights_dir):
    script, *args = arguments(SAMPLE, out, weights_dir)
    return script, args


@pytest.mark.cluster
def test_the_sampler_on_two_nodes_writes_the_bytes_of_one_process(weights, sampled, tmp_path):
    port = free_port()
    nodes = [[*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1",
              f"--master_port={port}"] for rank in range(2)]
    results = launch_nodes(nodes, *sampler_arguments(tmp_path, weights))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    assert "on 2 x cpu" in results[0].stdout
    assert (tmp_path / "samples.npz").read_bytes() == sampled


@pytest.mark.cluster
def test_two_sampler_processes_stop_together_and_resume_to_the_same_bytes(weights, sampled, tmp_path):
    stop = {"target": "modeling.sampler:sample", "action": "signal", "nth": 3, "rank": 1}
    stopped = launch(two_processes(), *sampler_arguments(tmp_path, weights), faults=[stop])
    assert stopped.returncode != 0
    # rank 1's third batch is batch 5; rank 0 finishes batch 4 of the same round, and both stop there
    shards = sorted(p.name for p in (tmp_path / "samples" / "shards").iterdir())
    assert shards == [f"batch_{b:06d}.npz" for b in range(6)]
    resumed = launch(two_processes(), *sampler_arguments(tmp_path, weights))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "samples.npz").read_bytes() == sampled
