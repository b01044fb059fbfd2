"""Training data: pre-tokenized JSONL → memory-mapped arrays, the resumable sampler, ADM crops."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data.loader import ResumableSampler, training_dataset
from utils.data.images import center_crop_arr, ten_crops, to_tensor
from utils.config import load_config
from utils.errors import DataError
from utils.data.pretokenized import cache_path, open_pretokenized


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def records(n=5, length=16, seed=0):
    rng = np.random.default_rng(seed)
    return [{"class_id": int(rng.integers(10)), "tokens": rng.integers(1024, size=length).tolist()} for _ in range(n)]


def test_jsonl_round_trip_with_nested_tokens(tmp_path):
    recs = records(7)
    recs[3]["tokens"] = np.asarray(recs[3]["tokens"]).reshape(4, 4).tolist()  # nested lists are allowed
    path = tmp_path / "data.jsonl"
    write_jsonl(path, recs, extra_lines=[""])  # a blank last line is skipped
    dataset = open_pretokenized(str(path), str(tmp_path / "cache"))
    assert len(dataset) == 7 and dataset.seq_len == 16
    batch = dataset.__getitems__([6, 3, 0])
    for row, i in enumerate([6, 3, 0]):
        assert batch["tokens"][row].tolist() == np.asarray(recs[i]["tokens"]).reshape(-1).tolist()
        assert batch["class_ids"][row].item() == recs[i]["class_id"]
    assert batch["tokens"].dtype == torch.long
    cache = cache_path(str(path), str(tmp_path / "cache"))
    assert sorted(os.listdir(cache)) == ["class_ids.i32", "meta.json", "tokens.u16"]
    assert os.path.getsize(os.path.join(cache, "tokens.u16")) == 7 * 16 * 2  # uint16
    assert os.listdir(tmp_path / "cache") == [os.path.basename(cache)]  # no temporary directory left


def test_changed_file_is_converted_again(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, records(3, seed=0))
    first = open_pretokenized(str(path))
    assert os.path.dirname(first.directory) == str(tmp_path)  # cached next to the file by default
    new = records(4, seed=1)
    write_jsonl(path, new)
    second = open_pretokenized(str(path))
    assert first.directory != second.directory and len(second) == 4
    assert second.__getitems__([2])["tokens"][0].tolist() == new[2]["tokens"]


def test_corrupt_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, records(2), extra_lines=['{"class_id": 3, "tokens": [1, 2'])
    with pytest.raises(DataError, match=r"data.jsonl:3: corrupt line"):
        open_pretokenized(str(path), str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []  # nothing half-written


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"class_id": 1, "tokenz": [1]}', "corrupt line"),
        ('{"class_id": -1, "tokens": ' + json.dumps(list(range(16))) + "}", "class_id must be a non-negative"),
        ('{"class_id": 1, "tokens": ' + json.dumps(list(range(15))) + "}", "15 tokens, but the first line has 16"),
        ('{"class_id": 1, "tokens": ' + json.dumps([0.5] * 16) + "}", "tokens must be integers"),
    ],
)
def test_malformed_lines(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, records(1), extra_lines=[line])
    with pytest.raises(DataError, match=f"data.jsonl:2: {message}"):
        open_pretokenized(str(path))


def config_for(path, **model):
    return load_config(
        None,
        [
            f"dataset.params.pretokenization={path}",
            "model.generator.image_seq_len=16",
            f"model.generator.condition_num_classes={model.get('classes', 10)}",
            f"model.vq_model.codebook_size={model.get('codebook', 1024)}",
        ],
    )


def test_ids_beyond_the_model_are_errors_naming_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    recs = records(4)
    recs[2]["class_id"] = 10
    write_jsonl(path, recs)
    with pytest.raises(DataError, match=r"line 3: class id 10 >= num_classes 10"):
        training_dataset(config_for(path), tokenizer=None)
    recs[2]["class_id"] = 0
    recs[1]["tokens"][5] = 1100
    write_jsonl(path, recs)
    with pytest.raises(DataError, match=r"line 2: token id 1100 >= codebook size 1024"):
        training_dataset(config_for(path), tokenizer=None)
    assert len(training_dataset(config_for(path, codebook=2048), tokenizer=None)) == 4


def test_missing_data_is_an_error(tmp_path):
    with pytest.raises(DataError, match="pre-tokenized data not found: .*nothere.jsonl"):
        training_dataset(config_for(tmp_path / "nothere.jsonl"), tokenizer=None)
    config = load_config(None, [f"dataset.params.train_shards_path_or_url={tmp_path}/shard-{{0000..0003}}.tar"])
    from utils.data.loader import shard_loader

    with pytest.raises(DataError, match=r"4 of 4 training shards not found"):
        shard_loader(config, step=0)


def test_sampler_resumes_mid_stream_and_splits_the_global_batch():
    full = ResumableSampler(num_samples=10, batch_size=4, rank=0, world_size=1, seed=3)
    stream = [next(it) for it in [iter(full)] for _ in range(6)]
    flat = [i for batch in stream for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # each pass a permutation
    assert flat[:10] != flat[10:20]  # a new order every pass
    resumed = iter(ResumableSampler(10, 4, 0, 1, seed=3, start=8))  # from the third batch on
    assert [next(resumed) for _ in range(4)] == stream[2:]
    ranks = [iter(ResumableSampler(10, 2, r, 2, seed=3)) for r in range(2)]
    for batch in stream[:3]:
        assert next(ranks[0]) + next(ranks[1]) == batch


def checker_image(width, height):
    y, x = np.mgrid[:height, :width]
    channels = [x * 255 // width, y * 255 // height, ((x // 7 + y // 5) % 2) * 255]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def test_adm_center_crop_halves_with_box_then_bicubic():
    image = checker_image(1100, 1300)
    expected = image.resize((550, 650), Image.Resampling.BOX).resize((275, 325), Image.Resampling.BOX)
    expected = np.asarray(expected.resize((256, 303), Image.Resampling.BICUBIC))[23:279]
    out = center_crop_arr(image, 256)
    assert out.size == (256, 256)
    assert np.array_equal(np.asarray(out), expected)
    assert center_crop_arr(checker_image(300, 200), 256).size == (256, 256)  # upscaling a small image


def test_ten_crops_equal_torchvision_ten_crop():
    from torchvision.transforms import functional as TF

    image = checker_image(500, 333)
    ours = ten_crops(image, 64)
    reference = TF.ten_crop(center_crop_arr(image, int(64 * 1.1)), 64)
    assert len(ours) == 10
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, reference))


def test_shard_labels_beyond_the_model_are_errors_naming_the_member():
    from utils.data.loader import DecodeSample

    png = io.BytesIO()
    checker_image(4, 4).save(png, format="PNG")
    decode = DecodeSample(to_tensor, num_classes=10)
    image, label = decode({"__url__": "a.tar", "__key__": "k1", "png": png.getvalue(), "cls": b"9"})
    assert label == 9 and image.shape == (3, 4, 4)
    with pytest.raises(DataError, match=r"^shard a.tar member k2: class id 12, outside \[0, 10\)"):
        decode({"__url__": "a.tar", "__key__": "k2", "png": png.getvalue(), "cls": b"12"})
