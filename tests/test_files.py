"""utils/files.py: what a stopped write says (which limit, which file), the permissions of what the writers leave
(the umask's, as a plain `open` gives), and the temporaries a killed writer leaves, safetensors' own included."""

import errno
import fnmatch
import os
import stat
import textwrap

import numpy as np
import pytest
import torch

from modeling.rear import ReAR
from tiny_models import TINY_CONFIG
from utils.config import load_config
from utils.errors import OutputError
from utils.fid_samples.run import save_shard
from utils.files import LIBRARY_TEMPORARY, WriteStopped, atomic_open, atomic_path, write_json, write_stopped
from utils.training.optim import build_optimizer, build_scheduler
from utils.training.resume import clean_output_folder, save_checkpoint, save_weights, write_training_state

TINY = str(TINY_CONFIG)


@pytest.mark.parametrize("code, what, remedy", [
    (errno.ENOSPC, "the disk is full", "free some space"),
    (errno.EDQUOT, "the disk quota is exceeded", "free some space or raise the quota"),
    (errno.EFBIG, "the file-size limit (ulimit -f) is reached", "raise the limit (ulimit -f unlimited)"),
])
def test_a_stopped_write_says_which_limit_and_names_the_file(tmp_path, code, what, remedy):
    path = str(tmp_path / "x.npz")
    stopped = write_stopped(OSError(code, os.strerror(code)), path)
    assert (stopped.what, stopped.file, stopped.remedy) == (what, path, remedy)
    assert str(stopped) == f"{what}: could not write {path} ([Errno {code}] {os.strerror(code)}); {remedy} and rerun"


def test_a_library_error_without_errno_is_told_apart_by_the_file_size_limit(tmp_path, monkeypatch):
    """torch writes through C++ streams: its error ('unexpected pos', 'iostream error') keeps no errno."""
    folder = tmp_path / "checkpoint.tmp-save"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "optimizer.pt").write_bytes(b"x" * 4096)  # cut at the limit
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4032")
    assert write_stopped(error, str(folder)) is None  # no limit, space left: a bug, not a full disk
    monkeypatch.setattr("utils.files._file_size_limit", lambda: 4096)
    stopped = write_stopped(error, str(folder))
    assert (stopped.what, stopped.file) == ("the file-size limit (ulimit -f: 4096 bytes) is reached",
                                            str(folder / "optimizer.pt"))
    assert stopped.detail == f"{folder}/optimizer.pt: {error}"


def test_an_atomic_write_stopped_by_a_full_disk_is_one_error_and_leaves_nothing(tmp_path):
    path = tmp_path / "summary.json"
    with pytest.raises(OutputError, match=rf"^the disk is full: could not write {path} \("):
        with atomic_open(str(path)) as f:
            f.write("{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WriteStopped):  # what a writer sees to add its own advice
        with atomic_path(str(path)):
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))


@pytest.fixture
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(folder):
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)],
                         indirect=["umask"], ids=["umask 022", "umask 002"])
def test_weights_checkpoints_and_outputs_get_the_umasks_permissions(tmp_path, umask, file_mode, folder_mode):
    """safetensors writes through a private 0600 temporary: a colleague could not read a run's weights."""
    config = load_config(TINY)
    model = ReAR(config)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    save_weights(str(tmp_path / "generator.safetensors"), model.state_dict())
    save_checkpoint(str(tmp_path), 2, {"samples_seen": 16},
                    lambda directory: write_training_state(directory, model, optimizer,
                                                           build_scheduler(optimizer, config)), lambda: None, 0)
    write_json(str(tmp_path / "summary.json"), {"step": 2})
    save_shard(str(tmp_path / "batch_000000.npz"), {"arr_0": np.zeros((1, 2, 2, 3), np.uint8),
                                                   "tokens": np.zeros((1, 4), np.int32), "labels": np.zeros(1)})
    checkpoint = "checkpoints/checkpoint-00000002"
    assert modes(tmp_path) == {
        "batch_000000.npz": file_mode, "checkpoints": folder_mode, checkpoint: folder_mode,
        **{f"{checkpoint}/{name}": file_mode for name in ("manifest.json", "model.safetensors", "optimizer.pt",
                                                          "rng_state_0.pt", "scheduler.pt", "train_state.json")},
        "generator.safetensors": file_mode, "summary.json": file_mode,
    }


KILL_INSIDE_SAFETENSORS = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from safetensors.torch import save_file

    folder, writer = sys.argv[1], os.getpid()
    weights = {"w": torch.zeros(25_000_000)}  # 100 MB: a write long enough to be caught in the middle
    if os.fork() == 0:  # a watcher: kills the writer as soon as safetensors' own temporary appears
        deadline = time.time() + 60
        while time.time() < deadline and not any(n.startswith(".tmp") for n in os.listdir(folder)):
            pass
        os.kill(writer, signal.SIGKILL)
        os._exit(0)
    save_file(weights, os.path.join(folder, "generator.safetensors.tmp-1"))
    time.sleep(60)  # written before the watcher saw it: the test fails on the missing temporary
""")


def test_a_kill_inside_safetensors_leaves_a_temporary_the_next_run_removes(server, tmp_path):
    run, script = tmp_path / "run", tmp_path / "kill_inside_safetensors.py"
    run.mkdir()
    (run / "config.yaml").write_text("kept\n")
    script.write_text(KILL_INSIDE_SAFETENSORS)
    assert server.run([str(script), str(run)], timeout=120).returncode == -9
    leftovers = [name for name in os.listdir(run) if name != "config.yaml"]
    assert len(leftovers) == 1 and fnmatch.fnmatch(leftovers[0], LIBRARY_TEMPORARY), leftovers
    clean_output_folder(str(run))  # what the next training run does first
    assert os.listdir(run) == ["config.yaml"]


def test_a_killed_writers_temporary_is_removed_by_the_next_write_of_that_file(tmp_path):
    (tmp_path / "grid.png.tmp-999").write_bytes(b"half a png")  # e.g. the demo's --out, killed mid-write
    (tmp_path / "other.png.tmp-999").write_bytes(b"another file's")
    with atomic_open(str(tmp_path / "grid.png"), "wb") as f:
        f.write(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "other.png.tmp-999"]
