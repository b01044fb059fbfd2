"""The 50k-sample run (utils/fid_samples/run.py): class plan, seeds, the streamed .npz; the sampling options and
uint8 conversion of modeling/sampler.py."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from tiny_models import TINY_CONFIG
from utils.config import load_config
from modeling.sampler import SamplingOptions, effective_precision, to_uint8
from utils.errors import OutputError, UserError
from utils.fid_samples.run import (
    batch_bounds,
    batch_seed,
    batches_of_rank,
    class_labels,
    prepare_sample_dir,
    save_shard,
    write_npz_from_shards,
)


def test_class_labels_in_order_and_balanced():
    labels = class_labels(50_000, 1000)
    assert labels.dtype == np.int64 and labels.shape == (50_000,)
    assert np.array_equal(np.bincount(labels), np.full(1000, 50))
    assert labels[[0, 49, 50, 99, 100, 49_999]].tolist() == [0, 0, 1, 1, 2, 999]
    with pytest.raises(UserError, match="multiple of the 1000 classes"):
        class_labels(50_001, 1000)


def test_batches_cover_every_sample_once_whatever_the_world_size():
    bounds = batch_bounds(20, 3)
    assert bounds == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (15, 18), (18, 20)]
    for world in (1, 2, 3, 8):
        owned = sorted(b for rank in range(world) for b in batches_of_rank(len(bounds), rank, world))
        assert owned == list(range(7))
    assert list(batches_of_rank(7, 1, 3)) == [1, 4]


def test_batch_seeds_are_fixed_and_distinct():
    seeds = {batch_seed(s, b) for s in range(4) for b in range(400)}
    assert len(seeds) == 1600  # no (seed, batch) pair shares a stream, unlike seed + batch
    assert batch_seed(0, 1) != batch_seed(1, 0)
    assert batch_seed(0, 0) == int(np.random.SeedSequence([0, 0]).generate_state(1)[0]) == 2968811710


def test_options_default_to_the_models_released_settings():
    config = load_config(str(TINY_CONFIG))
    assert SamplingOptions.from_config(config) == SamplingOptions(4.0, 2.75, 1.0, None, None, True, "fast", "fp32")
    config = load_config(
        str(TINY_CONFIG),
        ["sampling.guidance_scale=0", "sampling.temperature=0.9", "sampling.top_k=5", "model.generator.kv_cache=false",
         "sampling.sampler=plain", "sampling.precision=bf16"],
    )
    assert SamplingOptions.from_config(config) == SamplingOptions(0.0, 2.75, 0.9, 5, None, False, "plain", "bf16")


def test_bf16_only_on_cuda():
    assert effective_precision("bf16", torch.device("cpu")) == "fp32"
    assert effective_precision("bf16", torch.device("cuda", 0)) == "bf16"


def test_to_uint8_truncates_like_the_original():
    images = torch.tensor([-0.5, 0.0, 0.5, 0.999, 1.0, 1.5]).view(1, 3, 1, 2)
    out = to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 3)
    assert out.transpose(0, 3, 1, 2).ravel().tolist() == [0, 0, 127, 254, 255, 255]


def shards_of(tmp_path, sizes, image_shape=(5, 4, 3), prefix="s"):
    rng = np.random.default_rng(0)
    arrays, paths = [], []
    for i, n in enumerate(sizes):
        arrays.append({"arr_0": rng.integers(0, 256, (n, *image_shape), dtype=np.uint8),
                       "tokens": rng.integers(0, 1024, (n, 7), dtype=np.int32),
                       "labels": np.arange(n, dtype=np.int64)})
        paths.append(str(tmp_path / f"{prefix}{i}.npz"))
        save_shard(paths[-1], arrays[-1])
    return arrays, paths


def test_streamed_npz_is_byte_identical_to_np_savez(tmp_path):
    arrays, paths = shards_of(tmp_path, (3, 3, 2))
    shapes = write_npz_from_shards(str(tmp_path / "out.npz"), paths)
    assert shapes == {"arr_0": (8, 5, 4, 3), "tokens": (8, 7), "labels": (8,)}
    expected = io.BytesIO()
    np.savez(expected, **{k: np.concatenate([a[k] for a in arrays]) for k in ("arr_0", "tokens", "labels")})
    written = (tmp_path / "out.npz").read_bytes()
    assert written == expected.getvalue()
    with zipfile.ZipFile(tmp_path / "out.npz") as archive:
        assert archive.namelist() == ["arr_0.npy", "tokens.npy", "labels.npy"]
        assert archive.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
    assert not list(tmp_path.glob("*.tmp-*"))


def test_streamed_npz_refuses_mismatched_shards(tmp_path):
    _, a = shards_of(tmp_path, (2,), (4, 4, 3), prefix="a")
    _, b = shards_of(tmp_path, (2,), (8, 8, 3), prefix="b")
    with pytest.raises(UserError, match="b0.npz holds arr_0"):
        write_npz_from_shards(str(tmp_path / "out.npz"), a + b)
    assert not (tmp_path / "out.npz").exists() and not list(tmp_path.glob("out.npz*"))


def test_rerun_with_other_settings_is_refused(tmp_path):
    folder = str(tmp_path / "samples")
    settings = {"seed": 0, "per_proc_batch_size": 4, "generator_checkpoint": "a.safetensors (10 bytes)"}
    assert prepare_sample_dir(folder, settings) is False
    assert prepare_sample_dir(folder, settings) is False
    # nothing sampled yet (a run stopped before its first shard): the settings of the new run replace the old ones
    assert prepare_sample_dir(folder, {**settings, "seed": 5}) is False
    assert json.loads((tmp_path / "samples" / "sampling.json").read_text())["seed"] == 5
    assert prepare_sample_dir(folder, settings) is False
    (tmp_path / "samples" / "shards" / "batch_000000.npz").write_bytes(b"")  # a shard made: refused from now on
    with pytest.raises(OutputError, match=r"seed: 0 \(there\) vs 1 \(now\)"):
        prepare_sample_dir(folder, {**settings, "seed": 1})
    with pytest.raises(OutputError, match=r"a.safetensors \(10 bytes\)' \(there\) vs 'b.safetensors \(10 bytes\)'"):
        prepare_sample_dir(folder, {**settings, "generator_checkpoint": "b.safetensors (10 bytes)"})
    (tmp_path / "other.npz").write_bytes(b"")
    with pytest.raises(OutputError, match="other.npz"):
        prepare_sample_dir(str(tmp_path / "other"), settings)
