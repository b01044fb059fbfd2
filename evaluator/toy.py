"""Score samples of the toy run: the share the toy classifier assigns to the requested class, and FID against fresh
toy images when the Inception weights are given.

    python -m evaluator.toy runs/rear_toy_samples.npz config=runs/rear_toy/config.yaml [--inception-weights PATH]

The npz is what scripts/sample_imagenet_rear.py writes (`arr_0` images, `labels`); the config is the run's own
(`config.yaml` in its output folder), which says which toy classes and image size the samples were drawn for.
"""

from __future__ import annotations

import numpy as np
import torch

from evaluator.evaluation import check_sample_counts
from evaluator.metrics import compute_statistics, frechet_distance
from utils.cli import Script, file_to_write, flag_parser, positive_int, run
from utils.data.toy import toy_class_share, toy_images
from utils.errors import DataError, UsageError
from utils.files import write_json

FLAGS = flag_parser()
FLAGS.add_argument("--inception-weights", default=None, help="also FID against fresh toy images (weights file)")
FLAGS.add_argument("--allow-few-samples", action="store_true", help="FID over fewer than 2048 images anyway")
FLAGS.add_argument("--batch-size", type=positive_int, default=64, help="images per Inception forward pass")
FLAGS.add_argument("--json", type=file_to_write, default=None, help="also write the scores to this JSON file")

SCRIPT = Script(
    usage="python -m evaluator.toy SAMPLES.npz config=RUN/config.yaml [--inception-weights PATH] [--json OUT]",
    summary="Score toy samples: the toy classifier's share of samples that show the requested class, and FID "
            "against fresh toy images when the Inception weights are given.",
    example="python -m evaluator.toy runs/rear_toy_samples.npz config=runs/rear_toy/config.yaml",
    sections=("dataset.toy",),
    flags=FLAGS,
    positional="samples",  # the samples .npz (arr_0 uint8 images, labels), before or after config=
)


def load_samples(path: str, num_classes: int):
    """uint8 images (N, H, W, 3) and their labels (the npz's `labels`, else classes in order, equally many)."""
    try:
        with np.load(path) as npz:
            images = npz["arr_0"]
            labels = npz["labels"] if "labels" in npz else np.arange(len(images)) // (len(images) // num_classes)
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path}: not a samples .npz with arr_0 ({err})") from None
    return images, labels


def toy_uint8_images(count: int, toy, seed: int):
    """`count` toy images (of the `dataset.toy` section `toy`) as the bytes a samples .npz holds, uint8
    (N, H, W, 3), and their labels (N,)."""
    images, labels = toy_images(count, toy.num_classes, toy.image_size, seed)
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy(), labels.numpy()


def toy_fid(images: np.ndarray, config, weights: str, batch_size: int, device: str) -> float:
    """FID of `images` against as many fresh toy images (a seed the training set does not use)."""
    from evaluator.features import InceptionFeatures, inception_weights_path

    reference, _ = toy_uint8_images(len(images), config.dataset.toy, seed=config.dataset.toy.seed + 2)
    features = InceptionFeatures(inception_weights_path(weights), device)

    def pool(batch):
        return np.concatenate([features(batch[i : i + batch_size])["pool"] for i in range(0, len(batch), batch_size)])

    return frechet_distance(*compute_statistics(pool(images)), *compute_statistics(pool(reference)))


def main(config, flags) -> dict:
    if config.dataset.name != "toy":
        raise UsageError(f"config is not a toy run's (dataset.name is '{config.dataset.name}'): pass the run's "
                         "config.yaml, or score ImageNet samples with python -m evaluator REF.npz SAMPLES.npz")
    images, labels = load_samples(flags.samples, config.dataset.toy.num_classes)
    share = toy_class_share(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels),
                            config)
    scores = {"toy_class_share": share, "num_samples": len(images), "chance": 1 / config.dataset.toy.num_classes}
    print(f"toy classifier: {share:.3f} of {len(images)} samples show the requested class "
          f"(chance {scores['chance']:.2f})")
    if flags.inception_weights:
        check_sample_counts({flags.samples: len(images)}, flags.allow_few_samples)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scores["FID"] = toy_fid(images, config, flags.inception_weights, flags.batch_size, device)
        print(f"FID against {len(images)} fresh toy images: {scores['FID']:.3f}")
    if flags.json:
        write_json(flags.json, scores)
    return scores


if __name__ == "__main__":
    run(SCRIPT, main)
