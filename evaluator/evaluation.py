"""ADM's evaluation of a sample batch against a reference batch: Inception Score, FID, sFID, precision, recall."""
import torch

from evaluator.activations import batch_activations, batch_statistics
from evaluator.features import InceptionFeatures, inception_weights_path
from evaluator.metrics import frechet_distance, inception_score, precision_recall
from evaluator.npz import NpzImages


def evaluate(ref_batch, sample_batch, batch_size=64, device=None, inception_weights=None):
    """The five numbers of ADM's evaluator, in the order it prints them."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref_images, sample_images = NpzImages(ref_batch), NpzImages(sample_batch)  # bad input fails before any work
    features = InceptionFeatures(inception_weights_path(inception_weights), device)
    ref = batch_activations(ref_images, features, batch_size)
    sample = batch_activations(sample_images, features, batch_size)
    ref_pool, ref_spatial = batch_statistics(ref_images.path, ref)
    sample_pool, sample_spatial = batch_statistics(sample_images.path, sample)
    precision, recall = precision_recall(ref["pool"], sample["pool"], device=device)
    return {
        "Inception Score": inception_score(sample["softmax"]),
        "FID": frechet_distance(*sample_pool, *ref_pool),
        "sFID": frechet_distance(*sample_spatial, *ref_spatial),
        "Precision": precision,
        "Recall": recall,
    }
