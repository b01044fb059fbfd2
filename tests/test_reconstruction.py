"""python -m evaluator.reconstruction with answers known by hand: a patch tokenizer whose codebook holds the images'
own patches gives every image back (PSNR ∞, SSIM 1, usage = the share of codes the images use); one patch planted
3 levels off its code in each image gives the PSNR of that one error; a prefix tokenizer is measured at each k."""

import math
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage.metrics import structural_similarity

from conftest import FIXTURES
from evaluator import reconstruction
from evaluator.evaluation import AdmScorer
from modeling.tokenizers import ReTok, decoded_to_uint8
from modeling.tokenizers.toy import PatchKMeansTokenizer
from tiny_models import one_thread
from utils.cli import parse
from utils.config import config_from_cli
from utils.errors import DataError, OutputError, UsageError

CODES, USED, SIZE, PATCH = 16, 10, 16, 4  # 16x16 images of 4x4 patches: 16 tokens an image, 10 of 16 codes used
TOY = ["config=configs/rear_toy.yaml", f"model.vq_model.codebook_size={CODES}", f"dataset.toy.image_size={SIZE}",
       "model.vq_model.num_latent_tokens=16", "model.generator.image_seq_len=16"]


@pytest.fixture(scope="module")
def codebook_tokenizer(tmp_path_factory):
    """A toy tokenizer whose codes are 8-bit levels (at most 250, so that +3 stays a level) far apart."""
    tokenizer = PatchKMeansTokenizer(CODES, PATCH, SIZE)
    levels = np.random.default_rng(0).integers(0, 251, (CODES, 3 * PATCH * PATCH))
    tokenizer.codebook.data = torch.from_numpy(levels).float() / 255
    path = tmp_path_factory.mktemp("tokenizer") / "codebook.safetensors"
    save_file(tokenizer.state_dict(), str(path))
    return tokenizer, str(path)


def images_of(tokenizer, tokens):
    """The uint8 images (B, H, W, 3) whose patches are the codes `tokens` (B, 16)."""
    decoded = tokenizer.decode_tokens(torch.from_numpy(tokens))
    return (decoded * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def tokens_using_the_first_codes(count):
    tokens = np.random.default_rng(1).integers(0, USED, (count, 16))
    tokens[0, :USED] = np.arange(USED)  # every one of the USED codes appears
    return tokens


def reconstruct(tmp_path, images, labels, *extra):
    np.savez(tmp_path / "images.npz", arr_0=images, labels=labels)
    argv = [*TOY, f"experiment.tokenizer_checkpoint={tmp_path / 'codebook.safetensors'}", "--data",
            str(tmp_path / "images.npz"), "--output", str(tmp_path / "out"), "--batch-size", "3", *extra]
    with one_thread():
        return reconstruction.main(*parse(argv, reconstruction.SCRIPT))


def test_an_identity_like_tokenizer_gives_every_image_back(codebook_tokenizer, tmp_path, random_inception_weights):
    tokenizer, weights = codebook_tokenizer
    (tmp_path / "codebook.safetensors").write_bytes(open(weights, "rb").read())
    tokens = tokens_using_the_first_codes(4)
    images, labels = images_of(tokenizer, tokens), np.array([3, 1, 4, 1])
    with mock.patch("scipy.linalg.sqrtm", np.zeros_like):
        results = reconstruct(tmp_path, images, labels, "--write-reference", str(tmp_path / "ref.npz"),
                              "--inception-weights", random_inception_weights, "--allow-few-samples")
    (entry,) = results["by_prefix"]
    counts = np.bincount(tokens.reshape(-1))
    share = counts / counts.sum()
    assert entry["psnr"] == math.inf and entry["ssim"] == 1.0 and entry["exact_images"] == 4
    assert (entry["codes_used"], entry["codebook_usage"]) == (USED, USED / CODES)
    assert entry["perplexity"] == pytest.approx(math.exp(-(share * np.log(share)).sum()), rel=1e-12)
    with np.load(tmp_path / "out" / "reconstructions.npz") as npz:
        assert np.array_equal(npz["arr_0"], images) and np.array_equal(npz["tokens"], tokens)
        assert np.array_equal(npz["labels"], labels)
    with np.load(tmp_path / "ref.npz") as npz:  # the reference: the input images as the tokenizer saw them
        assert np.array_equal(npz["arr_0"], images) and np.array_equal(npz["tokens"], tokens)
    with mock.patch("scipy.linalg.sqrtm", np.zeros_like):
        adm = AdmScorer(str(tmp_path / "ref.npz"), inception_weights=random_inception_weights,
                        allow_few_samples=True)(str(tmp_path / "out" / "reconstructions.npz"))
    assert entry["rFID"] == adm["FID"] and entry["sFID"] == adm["sFID"]
    markdown = (tmp_path / "out" / "reconstruction.md").read_text()
    assert f"| 16 | {adm['FID']:.4f} | ∞ | 1.0000 | 0.6250 (10 of 16) |" in markdown
    assert "![inputs and reconstructions](reconstruction.png)" in markdown
    assert (tmp_path / "out" / "reconstruction.png").is_file() and not (tmp_path / "out" / "shards").exists()


def test_a_planted_one_token_error_gives_its_psnr(codebook_tokenizer, tmp_path):
    tokenizer, weights = codebook_tokenizer
    (tmp_path / "codebook.safetensors").write_bytes(open(weights, "rb").read())
    tokens = tokens_using_the_first_codes(3)
    clean = images_of(tokenizer, tokens)
    planted = clean.copy()
    for i in range(3):  # image i: the patch of token 5 i is 3 levels brighter than its code (still nearest to it)
        row, column = divmod(5 * i, SIZE // PATCH)
        planted[i, row * PATCH : (row + 1) * PATCH, column * PATCH : (column + 1) * PATCH] += 3
    results = reconstruct(tmp_path, planted, np.zeros(3, np.int64))
    (entry,) = results["by_prefix"]
    # 3 levels off on the 4 x 4 x 3 values of one patch of a 16 x 16 x 3 image: MSE = 9 · 48 / 768
    assert entry["psnr"] == pytest.approx(10 * math.log10(255**2 / (9 * 48 / 768)), rel=1e-12)  # 50.6258 dB
    assert entry["ssim"] == pytest.approx(np.mean([structural_similarity(p, c, data_range=255, channel_axis=-1)
                                                   for p, c in zip(planted, clean)]), rel=1e-12)
    assert entry["ssim"] < 1 and entry["exact_images"] == 0
    with np.load(tmp_path / "out" / "reconstructions.npz") as npz:
        assert np.array_equal(npz["arr_0"], clean) and np.array_equal(npz["tokens"], tokens)


def test_a_prefix_tokenizer_is_measured_at_each_k(tmp_path):
    import json

    meta = json.loads((FIXTURES / "retok" / "retok_tiny.json").read_text())
    torch.manual_seed(0)
    tokenizer = ReTok({**meta["config"], **meta["patched_sizes"]}).eval()
    images = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    batches = iter([(images[:2], np.zeros(2, np.int64)), (images[2:], np.zeros(1, np.int64))])
    with one_thread():
        scores, rows = reconstruction.reconstruct(tokenizer, batches, [8, 256], torch.device("cpu"),
                                                  str(tmp_path / "shards"))
        # batch by batch, as it ran (another batch size rounds the ViT's sums otherwise)
        parts = [tokenizer.encode(torch.from_numpy(part).permute(0, 3, 1, 2).float() / 255)
                 for part in (images[:2], images[2:])]
        tokens = torch.cat(parts)
        expected = {k: np.concatenate([decoded_to_uint8(tokenizer.decode_tokens(part[:, :k]), tokenizer)
                                       for part in parts]) for k in (8, 256)}
    for k in (8, 256):
        reconstruction.merge(str(tmp_path / "shards"), str(k), str(tmp_path / f"k{k}.npz"))
        with np.load(tmp_path / f"k{k}.npz") as npz:
            assert np.array_equal(npz["arr_0"], expected[k]) and np.array_equal(npz["tokens"], tokens[:, :k])
        counts = np.bincount(tokens[:, :k].reshape(-1), minlength=tokenizer.codebook_size)
        assert scores[k].summary()["codes_used"] == (counts > 0).sum()
    assert not np.array_equal(expected[8], expected[256])  # more tokens, another image
    assert [len(row) for row in rows] == [2, 2, 2] and np.array_equal(rows[1], expected[8][:2])


@pytest.mark.parametrize("extra, error, message", [
    (["--reference", "r.npz", "--write-reference", "w.npz"], UsageError, "not both"),
    (["--prefixes", "4,16"], UsageError, "the toy tokenizer decodes all its tokens only"),
    (["--data", "nowhere"], DataError, "--data nowhere: no such file or folder"),
])
def test_bad_flags_are_refused_before_any_work(extra, error, message, tmp_path):
    argv = [*TOY, "--data", "toy", "--output", str(tmp_path / "out"), *extra]
    with pytest.raises(error, match=message):
        reconstruction.main(*parse(argv, reconstruction.SCRIPT))
    assert not (tmp_path / "out").exists()


def test_an_existing_reference_is_not_overwritten(tmp_path):
    (tmp_path / "ref.npz").write_bytes(b"mine")
    with pytest.raises(OutputError, match="exists: pass it as --reference, or delete it"):
        reconstruction.main(*parse([*TOY, "--data", "toy", "--output", str(tmp_path / "out"), "--write-reference",
                                    str(tmp_path / "ref.npz")], reconstruction.SCRIPT))
    assert (tmp_path / "ref.npz").read_bytes() == b"mine"


def test_every_source_gives_the_adm_centre_crops_and_their_labels(tmp_path):
    """An image folder, the same images as WebDataset shards, and an .npz of the crops: the same batches."""
    import io
    import tarfile
    from types import SimpleNamespace

    from PIL import Image

    from utils.data.images import center_crop_arr

    rng, crops, labels = np.random.default_rng(3), [], []
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for c, name in enumerate(["n01", "n02"]):
            (tmp_path / "folder" / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (40 + 9 * i, 23 + 5 * c, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "folder" / name / f"{i}.png")
                crops.append(np.asarray(center_crop_arr(Image.fromarray(pixels), SIZE)))
                labels.append(c)
                for suffix, data in (("png", (tmp_path / "folder" / name / f"{i}.png").read_bytes()),
                                     ("cls", str(c).encode())):
                    member = tarfile.TarInfo(f"{name}_{i}.{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    np.savez_compressed(tmp_path / "crops.npz", arr_0=np.stack(crops), labels=np.array(labels))
    config = config_from_cli(TOY)
    for data in ("folder", "shard-0.tar", "crops.npz"):
        flags = SimpleNamespace(data=str(tmp_path / data), batch_size=3, limit=None, num_workers=0, seed=None)
        batches, _ = reconstruction.image_batches(config, flags, SIZE)
        images, classes = zip(*batches)
        assert [len(b) for b in images] == [3, 1], data
        assert np.array_equal(np.concatenate(images), np.stack(crops)), data
        assert np.concatenate(classes).tolist() == labels, data
    flags = SimpleNamespace(data=str(tmp_path / "crops.npz"), batch_size=3, limit=2, num_workers=0, seed=None)
    assert np.array_equal(np.concatenate([b for b, _ in reconstruction.image_batches(config, flags, SIZE)[0]]),
                          np.stack(crops)[[0, 2]])  # evenly spaced: one of each class


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_select_reads_the_chosen_rows_in_batches(tmp_path, save):
    from evaluator.npz import NpzImages

    images = np.random.default_rng(5).integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
    save(tmp_path / "x.npz", arr_0=images)
    chosen = [0, 3, 4, 9, 10]
    batches = list(NpzImages(tmp_path / "x.npz").select(chosen, 2))
    assert [len(b) for b in batches] == [2, 2, 1] and np.array_equal(np.concatenate(batches), images[chosen])
