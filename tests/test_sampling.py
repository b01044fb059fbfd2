"""utils/sampling.py: the class schedule, seeds, options, uint8 conversion and the streamed .npz."""

import io
import zipfile

import numpy as np
import pytest
import torch

from tiny_models import TINY_CONFIG
from utils.config import load_config
from utils.sampling import (
    SamplingOptions,
    batch_bounds,
    batch_seed,
    batches_of_rank,
    class_labels,
    effective_precision,
    prepare_sample_dir,
    to_uint8,
    write_npz_from_shards,
)


def test_class_labels_in_order_and_balanced():
    labels = class_labels(50_000, 1000)
    assert labels.dtype == np.int64 and labels.shape == (50_000,)
    assert np.array_equal(np.bincount(labels), np.full(1000, 50))
    assert labels[[0, 49, 50, 99, 100, 49_999]].tolist() == [0, 0, 1, 1, 2, 999]
    with pytest.raises(ValueError, match="multiple of the 1000 classes"):
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
    assert SamplingOptions.from_config(config) == SamplingOptions(4.0, 2.75, 1.0, None, None, True)
    config = load_config(
        str(TINY_CONFIG),
        ["sampling.guidance_scale=0", "sampling.temperature=0.9", "sampling.top_k=5", "model.generator.kv_cache=false"],
    )
    assert SamplingOptions.from_config(config) == SamplingOptions(0.0, 2.75, 0.9, 5, None, False)


def test_bf16_only_on_cuda():
    assert effective_precision("bf16", torch.device("cpu")) == "fp32"
    assert effective_precision("bf16", torch.device("cuda", 0)) == "bf16"
    with pytest.raises(ValueError, match="sampling.precision"):
        effective_precision("fp16", torch.device("cpu"))


def test_to_uint8_truncates_like_the_original():
    images = torch.tensor([-0.5, 0.0, 0.5, 0.999, 1.0, 1.5]).view(1, 3, 1, 2)
    out = to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 3)
    assert out.transpose(0, 3, 1, 2).ravel().tolist() == [0, 0, 127, 254, 255, 255]


def test_streamed_npz_is_byte_identical_to_np_savez(tmp_path):
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 256, (n, 5, 4, 3), dtype=np.uint8) for n in (3, 3, 2)]
    paths = []
    for i, shard in enumerate(shards):
        paths.append(str(tmp_path / f"s{i}.npy"))
        np.save(paths[-1], shard)
    shape = write_npz_from_shards(str(tmp_path / "out.npz"), paths, chunk_rows=2)
    assert shape == (8, 5, 4, 3)
    expected = io.BytesIO()
    np.savez(expected, arr_0=np.concatenate(shards))
    written = (tmp_path / "out.npz").read_bytes()
    assert written == expected.getvalue()
    with zipfile.ZipFile(tmp_path / "out.npz") as archive:
        assert archive.namelist() == ["arr_0.npy"]
        assert archive.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
    assert not list(tmp_path.glob("*.tmp"))


def test_streamed_npz_refuses_mismatched_shards(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 4, 4, 3), np.uint8))
    np.save(tmp_path / "b.npy", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="b.npy holds"):
        write_npz_from_shards(str(tmp_path / "out.npz"), [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")])
    assert not (tmp_path / "out.npz").exists()


def test_rerun_with_other_settings_is_refused(tmp_path):
    folder = str(tmp_path / "samples")
    settings = {"seed": 0, "per_proc_batch_size": 4}
    assert prepare_sample_dir(folder, settings) is False
    assert prepare_sample_dir(folder, settings) is False
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        prepare_sample_dir(folder, {**settings, "seed": 1})
    (tmp_path / "other.npz").write_bytes(b"")
    with pytest.raises(FileExistsError, match="other.npz"):
        prepare_sample_dir(str(tmp_path / "other"), settings)
