"""The ADM-compatible evaluator: metrics against closed forms and hand-computed answers, the .npz reader,
the Inception features' layout, the activation cache, and `python -m evaluator` end to end."""
import contextlib
import io
import json
import math
import os
import shutil
import urllib.error
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from evaluator import activations as activations_module
from evaluator.__main__ import main
from evaluator.activations import batch_activations, batch_statistics, cache_path
from evaluator.evaluation import evaluate
from evaluator.features import WEIGHTS_FILE, InceptionFeatures
from evaluator.metrics import compute_statistics, frechet_distance, inception_score, precision_recall
from evaluator.npz import NpzImages
from utils.errors import DataError

ADM_ORDER = ["Inception Score", "FID", "sFID", "Precision", "Recall"]


# ---------------------------------------------------------------------------------------------- metrics


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((100, 8))
    mu, sigma = compute_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_of_commuting_covariances_has_closed_form():
    # Same eigenvectors: ||mu1 - mu2||² + sum_i (a_i + b_i - 2 sqrt(a_i b_i)).
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([4.0, 1.0, 0.5, 9.0, 2.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 0.0, 3.0, 7.0])
    expected = 1 + 4 + 9 + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    sigma1, sigma2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # scipy's own note on the singular product
def test_frechet_distance_adds_eps_to_a_singular_product():
    # sigma1 sigma2 = [[0, 1], [0, 0]] has no square root (sqrtm gives inf); with eps on the diagonal the
    # product is (1 + eps) [[eps, 1], [0, eps]], whose square root has trace 2 sqrt(eps (1 + eps)).
    eps = 1e-6
    sigma1, sigma2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    with pytest.warns(UserWarning, match="singular product"):
        fid = frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2)
    assert fid == pytest.approx(2 - 4 * math.sqrt(eps * (1 + eps)), rel=1e-9)


def test_frechet_distance_rejects_an_imaginary_square_root():
    with pytest.raises(DataError, match="Imaginary component 1.0 .* the statistics are degenerate"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_compute_statistics_is_mean_and_unbiased_covariance():
    features = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    mu, sigma = compute_statistics(features)
    np.testing.assert_allclose(mu, [3.0, 3.0])
    np.testing.assert_allclose(sigma, [[4.0, -1.0], [-1.0, 7.0]])


def test_inception_score_closed_forms():
    assert inception_score(np.full((10, 1008), 1 / 1008, dtype=np.float32)) == pytest.approx(1.0, rel=1e-6)
    assert inception_score(np.eye(7, dtype=np.float32)) == pytest.approx(7.0, rel=1e-6)
    # Rows (a, 1-a) and (1-a, a): uniform marginal, KL = a log 2a + (1-a) log 2(1-a) for every row.
    a = 0.9
    probs = np.array([[a, 1 - a], [1 - a, a]] * 3)
    assert inception_score(probs) == pytest.approx(math.exp(a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a))))


def test_inception_score_averages_over_splits():
    # First split: 4 distinct one-hot rows (IS 4); second: uniform rows (IS 1).
    probs = np.concatenate([np.eye(4), np.full((4, 4), 0.25)])
    assert inception_score(probs, split_size=4) == pytest.approx(2.5)
    # One split of all 8 rows: uniform marginal, KL log 4 for the one-hot rows and 0 for the others.
    assert inception_score(probs, split_size=8) == pytest.approx(2.0)


def test_precision_recall_by_hand():
    # k = 1. Reference radii² (distance² to the nearest other reference): -30: 900, 0: 1, 1: 1, 5: 16.
    # Sample radii²: 0.5: 6.25, 3: 6.25, 5.5: 6.25, 20: 210.25.
    # Samples in a reference ball: 0.5 (0.25 <= 1 at 0), 3 (4 <= 16 at 5), 5.5 (0.25 <= 16 at 5); not 20.
    # References in a sample ball: 0, 1 and 5 (near 0.5 and 5.5); not -30 (930.25 > 6.25, 2500 > 210.25).
    ref = np.array([[-30.0], [0.0], [1.0], [5.0]])
    sample = np.array([[0.5], [3.0], [5.5], [20.0]])
    assert precision_recall(ref, sample, k=1) == (0.75, 0.75)


def test_precision_recall_balls_are_closed():
    # Reference radii² are 1; the sample at 2 lies exactly on the ball of the reference at 1.
    assert precision_recall(np.array([[0.0], [1.0]]), np.array([[2.0], [10.0]]), k=1) == (0.5, 1.0)


def test_precision_recall_uses_adm_float16_distances():
    # ADM rounds features to float16: 4.001 becomes 4.0, exactly on the ball (radius² 4) of the reference at 2.
    # In float32 it would lie outside (4.004 > 4) and precision would be 0.
    ref, sample = np.array([[0.0], [2.0]]), np.array([[4.001], [100.0]])
    assert precision_recall(ref, sample, k=1) == (0.5, 1.0)


def _brute_force_precision_recall(ref, sample, k):
    def squared(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.partition(squared(ref, ref), k, axis=1)[:, k]
    sample_radii = np.partition(squared(sample, sample), k, axis=1)[:, k]
    cross = squared(ref, sample)
    return (cross <= ref_radii[:, None]).any(0).mean(), (cross <= sample_radii[None, :]).any(1).mean()


@pytest.mark.parametrize("scale", [1, 100])  # scale 100: float16 overflows, ADM's float32 fallback
def test_precision_recall_matches_brute_force_in_any_blocking(scale):
    # Integer features keep every distance exact in float16 (scale 1) or float32 (scale 100).
    rng = np.random.default_rng(2)
    ref = rng.integers(-5, 6, (40, 8)).astype(np.float64) * scale
    sample = rng.integers(-4, 7, (30, 8)).astype(np.float64) * scale
    expected = _brute_force_precision_recall(ref, sample, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(ref, sample) == pytest.approx(expected, abs=0)
    assert precision_recall(ref, sample, batch_size=7) == pytest.approx(expected, abs=0)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# ------------------------------------------------------------------------------------------- npz reader


def _images(n, seed=0, size=64, high=256):
    return np.random.default_rng(seed).integers(0, high, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_stream_in_batches(tmp_path, save):
    images = _images(7, size=5)
    path = tmp_path / "batch.npz"
    save(path, mu=np.zeros(3), arr_0=images)  # arr_0 second: its data starts after another member
    reader = NpzImages(path)
    assert len(reader) == 7 and reader.shape == (7, 5, 5, 3)
    batches = list(reader.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_images_memory_map_stored_members(tmp_path):
    path = tmp_path / "batch.npz"
    np.savez(path, arr_0=_images(4, size=5))
    with mock.patch.object(np, "memmap", wraps=np.memmap) as memmap:
        list(NpzImages(path).batches(2))
    assert memmap.call_count == 1


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": _images(4, size=5)}, r"no 'arr_0' array \(it holds \['images'\]\)"),
        ({"arr_0": _images(4, size=5).astype(np.float32)},
         r"must be uint8 images of shape \(N, H, W, 3\), got float32"),
        ({"arr_0": _images(4, size=5)[..., 0]}, r"got uint8 \(4, 5, 5\)"),
        ({"arr_0": np.zeros((4, 5, 5, 4), np.uint8)}, r"got uint8 \(4, 5, 5, 4\)"),
        ({"arr_0": _images(1, size=5)}, "at least 2 images"),
    ],
)
def test_npz_images_reject_bad_input(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        NpzImages(path)


def test_npz_images_reject_missing_and_non_npz_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        NpzImages(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz file"):
        NpzImages(tmp_path / "text.npz")


def test_npz_images_reject_truncated_compressed_data(tmp_path):
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (4, 5, 5, 3)})
        f.write(bytes(2 * 5 * 5 * 3 + 1))
    with pytest.raises(ValueError, match="ends after 2 of 4 images"):
        list(NpzImages(path).batches(2))


# ------------------------------------------------------------------------------------- Inception features




def test_inception_features_follow_adm_layout(random_inception_weights):
    features = InceptionFeatures(random_inception_weights)
    images = _images(1, size=40)
    out = features(images)
    assert {name: a.shape for name, a in out.items()} == {
        "pool": (1, 2048), "spatial": (1, 2023), "softmax": (1, 1008)}

    # spatial: Mixed_6d's 1x1 branch (TF's mixed_6/conv), first 7 channels, flattened in (H, W, C) order.
    net = features.net
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
    for layer in [net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.MaxPool_1, net.Conv2d_3b_1x1,
                  net.Conv2d_4a_3x3, net.MaxPool_2, net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
                  net.Mixed_6b, net.Mixed_6c]:
        x = layer(x)
    mixed_6_conv = F.relu(net.Mixed_6d.branch1x1.bn(net.Mixed_6d.branch1x1.conv(x)))  # (1, 192, 17, 17)
    np.testing.assert_allclose(out["spatial"].reshape(1, 17, 17, 7), mixed_6_conv[:, :7].permute(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-6)

    # softmax: of pool_3 times the classifier's weight, without its bias (ADM's softmax graph).
    logits = torch.from_numpy(out["pool"]) @ net.fc.weight.T
    np.testing.assert_allclose(out["softmax"], torch.softmax(logits, 1), rtol=1e-5, atol=1e-8)
    assert net.fc.bias.abs().sum() > 0


# --------------------------------------------------------------------------------------- activation cache


class _CountingFeatures:
    """Stands in for InceptionFeatures: cheap deterministic features, and a count of the images seen."""

    def __init__(self, directory):
        self.weights_path = directory / "fake-weights.pth"
        self.weights_path.write_bytes(b"weights")
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += len(images)
        pixels = images.reshape(len(images), -1).astype(np.float32)
        softmax = np.full((len(images), 2), 0.5, np.float32)
        return {"pool": pixels[:, :4], "spatial": pixels[:, 4:7], "softmax": softmax}


def test_activations_are_cached_once_and_reused(tmp_path):
    path = str(tmp_path / "ref.npz")
    np.savez(path, arr_0=_images(5, size=4))
    features = _CountingFeatures(tmp_path)
    first = batch_activations(NpzImages(path), features, batch_size=2)
    assert features.images_seen == 5
    assert sorted(os.listdir(tmp_path)) == sorted(["ref.npz", "fake-weights.pth", Path(cache_path(path)).name])
    assert Path(cache_path(path)).name.startswith("ref.") and cache_path(path).endswith(".activations.npz")

    second = batch_activations(NpzImages(path), features, batch_size=2)
    assert features.images_seen == 5
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])

    features.weights_path.write_bytes(b"other weights")  # another network: the cache does not apply
    batch_activations(NpzImages(path), features, batch_size=2)
    assert features.images_seen == 10


def test_activation_cache_is_keyed_by_content(tmp_path):
    path = str(tmp_path / "ref.npz")
    np.savez(path, arr_0=_images(3, seed=0, size=4))
    before = cache_path(path)
    np.savez(path, arr_0=_images(3, seed=1, size=4))
    assert cache_path(path) != before


def test_a_failed_cache_write_leaves_no_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ref.npz")
    np.savez(path, arr_0=_images(3, size=4))

    def savez_then_fail(f, **arrays):
        f.write(b"half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(activations_module.np, "savez", savez_then_fail)
    with pytest.warns(UserWarning, match="disk full"):
        activations = batch_activations(NpzImages(path), _CountingFeatures(tmp_path), batch_size=2)
    assert activations["pool"].shape == (3, 4)
    assert sorted(os.listdir(tmp_path)) == ["fake-weights.pth", "ref.npz"]


def test_non_finite_features_are_rejected(tmp_path):
    path = str(tmp_path / "ref.npz")
    np.savez(path, arr_0=_images(3, size=4))
    broken = mock.Mock(weights_path=_CountingFeatures(tmp_path).weights_path, side_effect=lambda images: {
        "pool": np.full((len(images), 4), np.nan, np.float32), "spatial": np.zeros((len(images), 3), np.float32),
        "softmax": np.full((len(images), 2), 0.5, np.float32)})
    with pytest.raises(ValueError, match="pool features are not finite"):
        batch_activations(NpzImages(path), broken, batch_size=2)
    assert sorted(os.listdir(tmp_path)) == ["fake-weights.pth", "ref.npz"]


def test_statistics_stored_in_the_npz_take_precedence(tmp_path):
    activations = {"pool": np.arange(12.0).reshape(4, 3), "spatial": np.arange(8.0).reshape(4, 2) ** 2}
    stored = tmp_path / "stored.npz"
    np.savez(stored, arr_0=_images(4, size=4),
             mu=np.ones(3), sigma=np.eye(3), mu_s=np.zeros(2), sigma_s=2 * np.eye(2))
    (mu, sigma), (mu_s, sigma_s) = batch_statistics(stored, activations)
    for got, want in [(mu, np.ones(3)), (sigma, np.eye(3)), (mu_s, np.zeros(2)), (sigma_s, 2 * np.eye(2))]:
        np.testing.assert_array_equal(got, want)

    pool_only = tmp_path / "pool_only.npz"
    np.savez(pool_only, arr_0=_images(4, size=4), mu=np.ones(3), sigma=np.eye(3))
    (mu, _), (mu_s, sigma_s) = batch_statistics(pool_only, activations)
    np.testing.assert_array_equal(mu, np.ones(3))
    np.testing.assert_array_equal(mu_s, activations["spatial"].mean(0))
    np.testing.assert_array_equal(sigma_s, np.cov(activations["spatial"], rowvar=False))


# ------------------------------------------------------------------------------------------- end to end


def _zero_sqrtm():
    """scipy's sqrtm of a 2048² matrix takes ~20 s on a 2-core CPU and the Fréchet distance is tested above, so
    the end-to-end tests use a zero square root: FID = ||mu1 - mu2||² + Tr(sigma1) + Tr(sigma2)."""
    return mock.patch("evaluator.metrics.linalg.sqrtm", np.zeros_like)


def _fid_with_zero_sqrtm(stats1, stats2):
    (mu1, sigma1), (mu2, sigma2) = stats1, stats2
    return float((mu1 - mu2).dot(mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, random_inception_weights):
    """`python -m evaluator REF SAMPLE --json OUT` on 4 + 4 images: the paths, stdout and the JSON."""
    directory = tmp_path_factory.mktemp("cli")
    ref, sample, out = str(directory / "ref.npz"), str(directory / "sample.npz"), directory / "metrics.json"
    np.savez(ref, arr_0=_images(4, seed=0))
    np.savez_compressed(sample, arr_0=_images(4, seed=1, high=128))  # darker: its features differ
    stdout = io.StringIO()
    with _zero_sqrtm(), contextlib.redirect_stdout(stdout):
        main([ref, sample, "--inception-weights", random_inception_weights, "--batch-size", "3",
              "--allow-few-samples", "--json", str(out)])
    return ref, sample, stdout.getvalue(), json.loads(out.read_text())


def test_python_m_evaluator_prints_adm_metrics_in_order(cli_run):
    _, _, stdout, results = cli_run
    lines = stdout.splitlines()
    assert [line.split(": ")[0] for line in lines[:5]] == ADM_ORDER
    assert list(results) == ADM_ORDER + ["precision_recall"]
    assert [float(line.split(": ")[1]) for line in lines[:5]] == [results[k] for k in ADM_ORDER]
    n_ref, n_sample = len(np.load(cli_run[0])["arr_0"]), len(np.load(cli_run[1])["arr_0"])
    assert lines[5] == f"(precision / recall: k = 3 nearest neighbours, {n_ref} reference and {n_sample} sample images)"
    assert results["precision_recall"] == {"k": 3, "reference_images": n_ref, "sample_images": n_sample}


def test_python_m_evaluator_scores_the_right_features(cli_run):
    ref, sample, _, results = cli_run
    ref_acts, sample_acts = np.load(cache_path(ref)), np.load(cache_path(sample))
    assert results["Inception Score"] == inception_score(sample_acts["softmax"])
    for metric, features in [("FID", "pool"), ("sFID", "spatial")]:
        expected = _fid_with_zero_sqrtm(compute_statistics(sample_acts[features]),
                                        compute_statistics(ref_acts[features]))
        assert results[metric] == pytest.approx(expected, rel=1e-12) and expected > 0
    assert (results["Precision"], results["Recall"]) == precision_recall(ref_acts["pool"], sample_acts["pool"])


def test_rescoring_reuses_the_cached_activations(cli_run, random_inception_weights):
    ref, sample, _, results = cli_run
    with _zero_sqrtm(), mock.patch.object(InceptionFeatures, "__call__") as forward:
        assert evaluate(ref, sample, inception_weights=random_inception_weights, allow_few_samples=True) == {
            k: results[k] for k in ADM_ORDER}
    forward.assert_not_called()


def test_stored_reference_statistics_give_the_computed_fid(cli_run, random_inception_weights, tmp_path):
    ref, sample, _, computed = cli_run
    ref_acts = np.load(cache_path(ref))
    (mu, sigma), (mu_s, sigma_s) = compute_statistics(ref_acts["pool"]), compute_statistics(ref_acts["spatial"])
    with_stats = str(tmp_path / "ref_with_stats.npz")
    np.savez(with_stats, arr_0=np.load(ref)["arr_0"], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    shutil.copy(cache_path(ref), cache_path(with_stats))  # same images, same activations: skip the network
    with _zero_sqrtm():
        stored = evaluate(with_stats, sample, inception_weights=random_inception_weights, allow_few_samples=True)
    assert stored == pytest.approx({k: computed[k] for k in ADM_ORDER}, rel=1e-12)


def test_cli_reports_bad_input_without_a_traceback(cli_run, random_inception_weights, tmp_path, capsys):
    ref = cli_run[0]
    with pytest.raises(SystemExit) as exit_info:
        main([ref, str(tmp_path / "missing.npz"), "--inception-weights", random_inception_weights])
    assert exit_info.value.code == 1  # not a usage error: a file the user named is missing
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.npz'}: no such file\n"


def test_fid_over_fewer_samples_than_dimensions_is_refused_in_one_line(cli_run, random_inception_weights, capsys):
    ref, sample = cli_run[:2]
    with pytest.raises(SystemExit) as exit_info:
        main([ref, sample, "--inception-weights", random_inception_weights])
    assert exit_info.value.code == 2
    n_ref = len(np.load(ref)["arr_0"])
    assert capsys.readouterr().err == (
        f"error: FID needs ≥ 2048 samples (got {n_ref} in {ref}): with fewer images than its 2048 feature dimensions "
        "the covariance is singular and the distance means nothing; sample more (ADM's protocol: 50,000), or pass "
        "--allow-few-samples to compute it anyway\n")


def test_missing_weights_name_the_file_and_the_options(cli_run, tmp_path, monkeypatch, capsys):
    ref, sample = cli_run[:2]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr("evaluator.features.download_url_to_file", offline)
    with pytest.raises(SystemExit):
        main([ref, sample, "--allow-few-samples"])
    err = capsys.readouterr().err
    assert WEIGHTS_FILE in err and "--inception-weights PATH" in err and "no internet" in err
