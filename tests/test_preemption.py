"""Stop signals (SIGTERM, SIGUSR1, SIGINT: preemption, the time limit, Ctrl-C) at chosen points of training and of
the 50k sampler: the step or batch in progress ends, its work is saved through the usual atomic, checksummed path,
the process exits with 75, and the same command run again ends with exactly the bytes of the uninterrupted run
(no step lost). A second signal during the save changes nothing; a signal during the final outputs lets them
finish (exit 0). With two processes the signal may reach one of them or the launcher: every process stops after
the same step.

Each signal is a fault of tests/faults.py ("action": "signal") sent at a chosen call, in the script's own process
(tests/script_runner.py) or, under torchrun, through tests/with_faults.py. A few points run by default; all of
them with `python -m pytest -m "campaign or cluster" tests/test_preemption.py`.
"""

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from script_runner import ROOT
from test_reliability import SAMPLE, TRAIN, campaign, checkpoint, complete_checkpoints_damaged, fault, run, tree
from test_reliability import sampled, trained, weights  # noqa: F401  (fixtures: the uninterrupted runs)
from utils.preemption import SaveClock, STOPPED_EXIT_CODE, StopSignals
from utils.training.resume import damage, list_checkpoints

STEP = "utils.training.step:train_step"
SAVING = f"{checkpoint(2)}.tmp-save"


def signal_at(target, match="", nth=1, name="SIGTERM", **extra):
    return {**fault(target, "signal", match, nth), "signal": name, **extra}


# name: (signals, exit code, the step the stopped run saved last (None: it finished))
TRAIN_SIGNALS = {
    "SIGTERM mid-step": ([signal_at(STEP, nth=3)], STOPPED_EXIT_CODE, 3),
    "SIGUSR1 mid-step, at a step that saves anyway": ([signal_at(STEP, nth=4, name="SIGUSR1")], STOPPED_EXIT_CODE, 4),
    "SIGINT in the first step": ([signal_at(STEP, name="SIGINT")], STOPPED_EXIT_CODE, 1),
    # a signal during a save is read after the next step (the decision to save step 2 was taken before it came)
    "SIGTERM inside a save": ([signal_at("utils.training.resume:save_file", f"{SAVING}/model")], STOPPED_EXIT_CODE, 3),
    "SIGUSR1 inside the RNG state of a save": ([signal_at("torch:save", f"{SAVING}/rng_state_0", name="SIGUSR1")],
                                               STOPPED_EXIT_CODE, 3),
    "SIGTERM mid-step, a second one inside its save": (
        [signal_at(STEP, nth=3), signal_at("utils.training.resume:save_file", f"{checkpoint(3)}.tmp-save/model")],
        STOPPED_EXIT_CODE, 3),
    "SIGUSR1 inside a sample grid": ([signal_at("PIL.Image:Image.save", "step_00000003", name="SIGUSR1")],
                                     STOPPED_EXIT_CODE, 3),
    "SIGTERM in the last step": ([signal_at(STEP, nth=6)], 0, None),
    "SIGTERM during the final outputs (generator.safetensors)": (
        [signal_at("utils.training.resume:save_file", "generator.safetensors")], 0, None),
    "SIGUSR1 and SIGTERM during the final outputs (final.png, summary.json)": (
        [signal_at("PIL.Image:Image.save", "final.png", name="SIGUSR1"), signal_at("json:dump", "summary.json")],
        0, None),
}
TRAIN_SHORT = ["SIGTERM mid-step", "SIGTERM mid-step, a second one inside its save",
               "SIGTERM during the final outputs (generator.safetensors)"]


def stopped_then_resumed(server, argv, out, signals, code, weights=""):
    """Run `argv` with `signals`; expect exit `code`, then (if it stopped) run it again to the end."""
    stopped = run(server, argv, out, weights, signals)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert complete_checkpoints_damaged(out) == []
    if code == 0:
        return stopped, stopped
    resumed = run(server, argv, out, weights)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return stopped, resumed


@pytest.mark.parametrize("name", campaign(TRAIN_SIGNALS, TRAIN_SHORT))
def test_training_stopped_by_a_signal_saves_and_resumes_bit_exact(server, trained, tmp_path, name):
    signals, code, last_saved = TRAIN_SIGNALS[name]
    out = tmp_path / "run"
    stopped, resumed = stopped_then_resumed(server, TRAIN, out, signals, code)
    if last_saved is not None:  # the step in progress was finished and saved: no step lost
        saved = out / "checkpoints" / checkpoint(last_saved)
        assert stopped.stderr.splitlines()[-1] == (
            f"stopped by {signals[0]['signal']} after step {last_saved}, saved in {saved}: run the same command to "
            "continue (exit code 75)")
        assert f"resumed from {saved} at step {last_saved}" in resumed.stdout
    assert tree(out) == trained  # the same bytes as the uninterrupted run, nothing half-made left


def test_a_stop_at_a_step_that_saved_anyway_saves_it_once(server, tmp_path):
    out = tmp_path / "run"
    # a second rename of checkpoint 4 into place would kill the run (-9)
    once = fault("os:rename", "after", f"{checkpoint(4)}.tmp-save", nth=2)
    assert run(server, TRAIN, out, faults=[signal_at(STEP, nth=4), once]).returncode == STOPPED_EXIT_CODE
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == [checkpoint(2), checkpoint(4)]


def test_a_signal_to_every_process_of_the_run_spares_the_data_loader_workers(trained, tmp_path):
    """As a cluster signals a job: SIGTERM to the whole process group, with a data loader worker. The worker ignores
    it (a dead worker would stop the main process before its save), the run stops and saves, and resumes exactly."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "tests" / "with_faults.py"),
               *shlex.split(TRAIN.replace("{O}", str(out))), "dataset.params.num_workers_per_gpu=1"]
    group_signal = signal_at(STEP, nth=3, to="group")
    for faults, code in (([group_signal], STOPPED_EXIT_CODE), ([], 0)):
        result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                        "REAR_TEST_FAULTS": json.dumps(faults)},
                                capture_output=True, text=True, timeout=300, start_new_session=True)
        assert result.returncode == code, result.stderr[-3000:]
    assert tree(out) == trained


# ------------------------------------------------------------------------------------------- the 50k sampler
SAMPLE_SIGNALS = {  # 14 batches of 3 images (the last of one)
    "SIGTERM mid-batch": ([signal_at("modeling.sampler:sample", nth=4)], STOPPED_EXIT_CODE, 4),
    "SIGUSR1 mid-write of a shard": ([signal_at("numpy:savez", "batch_000005", name="SIGUSR1")],
                                     STOPPED_EXIT_CODE, 6),
    "SIGINT mid-batch, a second one mid-write of its shard": (
        [signal_at("modeling.sampler:sample", nth=2, name="SIGINT"), signal_at("numpy:savez", "batch_000001")],
        STOPPED_EXIT_CODE, 2),
    "SIGTERM in the last batch": ([signal_at("modeling.sampler:sample", nth=14)], 0, None),
}
SAMPLE_SHORT = ["SIGTERM mid-batch"]


@pytest.mark.parametrize("name", campaign(SAMPLE_SIGNALS, SAMPLE_SHORT))
def test_sampler_stopped_by_a_signal_keeps_its_shards_and_resumes_to_the_same_npz(server, weights, sampled,
                                                                                  tmp_path, name):
    signals, code, shards_kept = SAMPLE_SIGNALS[name]
    stopped = run(server, SAMPLE, tmp_path, weights, signals)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    if code == STOPPED_EXIT_CODE:
        shards = sorted(p.name for p in (tmp_path / "samples" / "shards").iterdir())
        assert shards == [f"batch_{b:06d}.npz" for b in range(shards_kept)]  # the batch in progress is kept
        assert stopped.stderr.splitlines()[-1] == (
            f"stopped by {signals[0]['signal']}; the batches made so far are kept in {tmp_path}/samples/shards: run "
            "the same command to continue (exit code 75)")
        assert run(server, SAMPLE, tmp_path, weights).returncode == 0
    assert (tmp_path / "samples.npz").read_bytes() == sampled
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "samples", "samples.npz", "samples/sampling.json"]


# ------------------------------------------------------------------------------------------- the parts
def test_stop_signals_are_recorded_not_raised_and_the_handlers_restored():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGINT)  # would be a KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process
        assert signals.received == "SIGINT"  # the first one is named
    assert signal.getsignal(signal.SIGINT) is before


def test_save_clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("utils.preemption.time.monotonic", lambda: now[0])
    clock, never = SaveClock(0.5), SaveClock(None)
    now[0] += 29.9
    assert not clock.due and not never.due
    now[0] += 0.1
    assert clock.due and not never.due
    clock.reset()
    assert not clock.due


def test_time_based_checkpoints_come_between_the_step_based_ones(server, trained, tmp_path):
    """experiment.save_every_minutes=1e-6 (60 us, less than any step): a checkpoint after every step, besides the
    steps of experiment.save_every, and the run ends with the weights of the run without them."""
    out = tmp_path / "run"
    result = run(server, TRAIN + " experiment.save_every_minutes=1e-6 experiment.keep_last_checkpoints=0", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == [checkpoint(s) for s in range(1, 7)]
    assert all(damage(p) is None for p in list_checkpoints(str(out)))
    state = json.loads((out / "checkpoints" / checkpoint(5) / "train_state.json").read_text())
    assert state["step"] == 5 and state["samples_seen"] == 40
    assert (out / "generator.safetensors").read_bytes() == trained["generator.safetensors"]
