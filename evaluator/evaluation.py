"""ADM's evaluation of a sample batch against a reference batch: Inception Score, FID, sFID, precision, recall."""
import torch

from utils.errors import UsageError

from evaluator.activations import batch_activations, batch_statistics
from evaluator.features import InceptionFeatures, inception_weights_path
from evaluator.metrics import frechet_distance, inception_score, precision_recall
from evaluator.npz import NpzImages


PRECISION_RECALL_K = 3
# A Fréchet distance over fewer images than feature dimensions rests on a singular covariance: it means nothing
# (it can even come out negative), so it is refused unless asked for.
FEATURE_DIMENSIONS = {"FID": 2048, "sFID": 2023}


def check_sample_counts(counts, allow_few_samples=False):
    """`counts`: {file: images}. A clear refusal when a batch is too small for FID / sFID."""
    for metric, dimensions in FEATURE_DIMENSIONS.items():
        for path, count in counts.items():
            if count < dimensions and not allow_few_samples:
                raise UsageError(
                    f"{metric} needs ≥ {dimensions} samples (got {count} in {path}): with fewer images than its "
                    f"{dimensions} feature dimensions the covariance is singular and the distance means nothing; "
                    "sample more (ADM's protocol: 50,000), or pass --allow-few-samples to compute it anyway"
                )


class AdmScorer:
    """A reference batch's Inception activations and statistics, computed once (and cached beside it), and ADM's five
    numbers of any sample batch against them: a guidance search scores every point against one reference."""

    def __init__(self, ref_batch, batch_size=64, device=None, inception_weights=None, allow_few_samples=False):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size, self.allow_few_samples = batch_size, allow_few_samples
        ref_images = NpzImages(ref_batch)
        check_sample_counts({ref_images.path: len(ref_images)}, allow_few_samples)
        self.features = InceptionFeatures(inception_weights_path(inception_weights), self.device)
        self.ref = batch_activations(ref_images, self.features, batch_size)
        self.ref_pool, self.ref_spatial = batch_statistics(ref_images.path, self.ref)

    def __call__(self, sample_batch):
        """The five numbers of ADM's evaluator for `sample_batch`, in the order it prints them."""
        sample_images = NpzImages(sample_batch)
        check_sample_counts({sample_images.path: len(sample_images)}, self.allow_few_samples)
        sample = batch_activations(sample_images, self.features, self.batch_size)
        sample_pool, sample_spatial = batch_statistics(sample_images.path, sample)
        precision, recall = precision_recall(self.ref["pool"], sample["pool"], k=PRECISION_RECALL_K,
                                             device=self.device)
        return {
            "Inception Score": inception_score(sample["softmax"]),
            "FID": frechet_distance(*sample_pool, *self.ref_pool),
            "sFID": frechet_distance(*sample_spatial, *self.ref_spatial),
            "Precision": precision,
            "Recall": recall,
        }


def evaluate(ref_batch, sample_batch, batch_size=64, device=None, inception_weights=None, allow_few_samples=False):
    """The five numbers of ADM's evaluator, in the order it prints them."""
    ref_images, sample_images = NpzImages(ref_batch), NpzImages(sample_batch)  # bad input fails before any work
    check_sample_counts({ref_images.path: len(ref_images), sample_images.path: len(sample_images)}, allow_few_samples)
    return AdmScorer(ref_batch, batch_size, device, inception_weights, allow_few_samples)(sample_batch)
