"""scripts/sample_imagenet_rear.py end to end with tiny random weights: one process, torchrun with two (gloo),
a run killed midway and resumed. The .npz bytes must not depend on any of that."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import load_script
from modeling.rear import ReAR
from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN
from tiny_models import ROOT, TINY_CONFIG, one_thread, write_tiny_weights
from utils.config import load_config
from utils.cli import parse
from utils.errors import OutputError
from utils.fid_samples.run import batch_seed

SCRIPT = ROOT / "scripts" / "sample_imagenet_rear.py"
NUM_SAMPLES, BATCH, SEED = 40, 3, 7  # 10 classes x 4; 14 batches, the last of one image
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count everywhere: same float sums, same bytes
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the venv's own, whatever is on PATH


def sample(argv):
    """The sampler as its __main__ runs it, in this process."""
    script = load_script("sample_imagenet_rear")
    script.main(*parse(argv, script.SCRIPT))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


def arguments(weights, output_dir):
    return [
        f"config={TINY_CONFIG}",
        f"experiment.generator_checkpoint={weights[0]}",
        f"experiment.tokenizer_checkpoint={weights[1]}",
        f"experiment.output_dir={output_dir}",
        f"sampling.num_samples={NUM_SAMPLES}",
        f"sampling.per_proc_batch_size={BATCH}",
        f"sampling.seed={SEED}",
    ]


def run_in_process(weights, output_dir):
    with one_thread():
        sample(arguments(weights, output_dir))


@pytest.fixture(scope="module")
def reference(weights, tmp_path_factory):
    """The .npz bytes of an uninterrupted one-process run."""
    output_dir = tmp_path_factory.mktemp("reference") / "samples"
    run_in_process(weights, output_dir)
    return (output_dir.parent / "samples.npz").read_bytes()


def load_npz(path):
    with np.load(path) as npz:
        assert list(npz.keys()) == ["arr_0", "tokens", "labels"]
        return npz["arr_0"], npz["tokens"], npz["labels"]


def test_one_process_writes_class_ordered_seeded_samples(weights, reference, tmp_path):
    path = tmp_path / "ref.npz"
    path.write_bytes(reference)
    samples, sampled_tokens, labels = load_npz(path)
    assert samples.dtype == np.uint8 and samples.shape == (NUM_SAMPLES, 16, 16, 3)
    assert sampled_tokens.dtype == np.int32 and sampled_tokens.shape == (NUM_SAMPLES, 16)
    assert np.array_equal(labels, np.arange(NUM_SAMPLES) // 4)
    # Batch 2 holds samples 6, 7, 8: classes 1, 1, 2 (4 per class, in order), drawn from the seed of batch 2.
    config = load_config(str(TINY_CONFIG))
    generator = ReAR.from_pretrained(config, weights[0])
    tokenizer = MaskGITVQGAN.from_pretrained(weights[1])

    def batch(classes):
        with one_thread():
            torch.manual_seed(batch_seed(SEED, 2))
            tokens = generator.generate(torch.tensor(classes), guidance_scale=4.0, guidance_scale_pow=2.75)
            images = tokenizer.decode_tokens(tokens)
        return (images.clamp(0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8).numpy(), tokens.numpy()

    images, tokens = batch([1, 1, 2])
    assert np.array_equal(samples[6:9], images) and np.array_equal(sampled_tokens[6:9], tokens)
    assert not np.array_equal(samples[6:9], batch([1, 2, 2])[0])  # the class shows in the pixels
    assert len({samples[i].tobytes() for i in range(NUM_SAMPLES)}) == NUM_SAMPLES


def test_two_processes_under_torchrun_give_the_same_bytes(weights, reference, tmp_path):
    output_dir = tmp_path / "samples"
    command = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(SCRIPT), *arguments(weights, output_dir)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x cpu" in result.stdout
    assert (tmp_path / "samples.npz").read_bytes() == reference
    assert not (output_dir / "shards").exists()


def test_killed_run_resumes_to_the_same_bytes(weights, reference, tmp_path):
    output_dir = tmp_path / "samples"
    shards = output_dir / "shards"
    command = [sys.executable, str(SCRIPT), *arguments(weights, output_dir)]
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while len(list(shards.glob("batch_*.npz"))) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = sorted(p.name for p in shards.glob("batch_*.npz"))
    assert 3 <= len(done) < 14 and not (tmp_path / "samples.npz").exists()
    # Also lose a finished shard and leave a torn temporary file behind, as a crash in np.save would.
    (shards / done[1]).unlink()
    (shards / "batch_000013.npz.tmp-999").write_bytes(b"PK torn")
    run_in_process(weights, output_dir)
    assert (tmp_path / "samples.npz").read_bytes() == reference
    assert not shards.exists()


def test_rerun_of_a_finished_run_changes_nothing_and_other_settings_are_refused(weights, reference, tmp_path, capsys):
    output_dir = tmp_path / "samples"
    run_in_process(weights, output_dir)
    written = (tmp_path / "samples.npz").stat().st_mtime_ns
    run_in_process(weights, output_dir)
    assert "complete; nothing to do" in capsys.readouterr().out
    assert (tmp_path / "samples.npz").stat().st_mtime_ns == written
    assert (tmp_path / "samples.npz").read_bytes() == reference
    with pytest.raises(OutputError, match=r"seed: 7 \(there\) vs 8 \(now\)"):
        sample(arguments(weights, output_dir) + ["sampling.seed=8"])


@pytest.mark.parametrize("damage", [b'{"seed": 7', b"\xff\xfe", b"[7]"])
def test_a_damaged_sampling_json_is_named_not_a_traceback(weights, tmp_path, damage):
    output_dir = tmp_path / "samples"
    output_dir.mkdir()
    (output_dir / "sampling.json").write_bytes(damage)
    with pytest.raises(OutputError, match=r"sampling.json is damaged .*delete .*samples to sample again"):
        sample(arguments(weights, output_dir))


def test_rear_test_sh_samples_then_reports(tmp_path):
    script = ROOT / "scripts_bash" / "rear_test.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr and "REF_BATCH" in usage.stderr
    helped = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("usage:") and "HELD_OUT" in helped.stdout
    # Stand-ins for torchrun and python that record their command lines.
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("torchrun", "python"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUTPUT_DIR": str(tmp_path / "out dir"),
           "HELD_OUT": "val.npz", "REPORT_FLAGS": "--search runs/search --limit 100"}
    result = subprocess.run(
        ["bash", str(script), "configs/rear_s.yaml", "reAR-S.safetensors", "8", "ref.npz", "sampling.seed=1"],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    out = f"{tmp_path}/out dir"
    assert log.read_text().splitlines() == [
        f"torchrun --standalone --nproc_per_node=8 {SCRIPT} config=configs/rear_s.yaml "
        f"experiment.generator_checkpoint=reAR-S.safetensors experiment.output_dir={out}/samples sampling.seed=1",
        f"python -m evaluator.report {out}/samples.npz config=configs/rear_s.yaml "
        f"experiment.generator_checkpoint=reAR-S.safetensors sampling.seed=1 --ref ref.npz --output {out} "
        "--held-out val.npz --search runs/search --limit 100",
    ]


def test_refusal_on_rank_0_stops_every_rank_under_torchrun(weights, reference, tmp_path):
    output_dir = tmp_path / "samples"
    output_dir.mkdir()
    run_in_process(weights, output_dir)  # a finished run with seed 7
    command = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(SCRIPT), *arguments(weights, output_dir),
               "sampling.seed=8"]
    start = time.time()
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "seed: 7 (there) vs 8 (now)" in result.stderr
    assert "rank 1: stopping, rank 0 failed" in result.stderr
    assert time.time() - start < 60  # not the barrier's timeout
    assert (tmp_path / "samples.npz").read_bytes() == reference  # untouched


def test_damaged_shards_and_temporaries_of_a_killed_run_are_redrawn_and_removed(weights, reference, tmp_path):
    """Shards damaged after they were written (empty, cut short, of another size) are found at the rerun and drawn
    again (their samples are fixed by the seed and the batch), and a killed writer's temporary is removed."""
    shards = tmp_path / "samples" / "shards"
    shards.mkdir(parents=True)
    (shards / "batch_000000.npz").write_bytes(b"")
    np.savez(shards / "batch_000001.npz", arr_0=np.zeros((BATCH, 16, 16, 3), np.uint8),
             tokens=np.zeros((BATCH, 16), np.int32), labels=np.zeros(BATCH, np.int64))
    whole = (shards / "batch_000001.npz").read_bytes()
    (shards / "batch_000001.npz").write_bytes(whole[: len(whole) // 2])
    np.savez(shards / "batch_000002.npz", arr_0=np.zeros((1, 16, 16, 3), np.uint8),
             tokens=np.zeros((1, 16), np.int32), labels=np.zeros(1, np.int64))
    (shards / "batch_000003.npz.tmp-999").write_bytes(b"PK torn")
    with pytest.warns(UserWarning) as warned:
        run_in_process(weights, tmp_path / "samples")
    assert [str(w.message) for w in warned] == [
        f"shard {shards}/batch_000000.npz is damaged (BadZipFile: File is not a zip file); drawing its samples again",
        f"shard {shards}/batch_000001.npz is damaged (BadZipFile: File is not a zip file); drawing its samples again",
        f"shard {shards}/batch_000002.npz is damaged (its arr_0 holds 1 rows, not 3); drawing its samples again",
    ]
    assert (tmp_path / "samples.npz").read_bytes() == reference
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "samples", "samples.npz", "samples/sampling.json"]


def test_a_leftover_temporary_in_the_shards_folder_is_removed_at_start(weights, tmp_path):
    shards = tmp_path / "samples" / "shards"
    shards.mkdir(parents=True)
    (shards / "batch_000003.npz.tmp-999").write_bytes(b"PK torn")
    from utils.fid_samples.run import prepare_sample_dir

    prepare_sample_dir(str(tmp_path / "samples"), {"seed": 7})
    assert sorted(p.name for p in shards.iterdir()) == []
