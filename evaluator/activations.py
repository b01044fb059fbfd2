"""A batch's Inception activations, cached next to its .npz, and its (mu, sigma) statistics.

The cache REF.<sha256[:16]>.activations.npz is keyed by the batch's content, so an edited batch is never
scored with stale features, and it records the Inception weights that made it.
"""
import hashlib
import math
import os
import warnings

import numpy as np
from tqdm import tqdm

from evaluator.metrics import compute_statistics
from utils.errors import OutputError, WeightsError
from utils.files import atomic_path, remove_temporaries_of

ACTIVATIONS = ("pool", "spatial", "softmax")


def batch_activations(images, features, batch_size):
    """Activations of all images of `images` (an NpzImages) under `features` (an InceptionFeatures),
    read from the cache when it was made from the same images with the same weights."""
    cache, weights_id = cache_path(images.path), content_hash(features.weights_path)
    if os.path.isfile(cache):
        with np.load(cache) as cached:
            if str(cached.get("weights_id")) == weights_id:
                return {name: cached[name] for name in ACTIVATIONS}
    activations = compute_activations(images, features, batch_size)
    _write_atomically(cache, {**activations, "weights_id": np.array(weights_id)})
    return activations


def cache_path(npz_path):
    return f"{npz_path.removesuffix('.npz')}.{content_hash(npz_path)}.activations.npz"


def content_hash(path):
    """First 16 hex digits of the file's SHA-256, read in 16 MiB chunks (batches are ~10 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def compute_activations(images, features, batch_size):
    batches = tqdm(images.batches(batch_size), total=math.ceil(len(images) / batch_size),
                   desc=f"Inception features of {os.path.basename(images.path)}", unit="batch")
    parts = [features(batch) for batch in batches]
    activations = {name: np.concatenate([part[name] for part in parts]) for name in ACTIVATIONS}
    for name, values in activations.items():
        if not np.isfinite(values).all():
            raise WeightsError(f"{images.path}: the Inception {name} features are not finite (NaN or inf); "
                             f"check the Inception weights file")
    return activations


def batch_statistics(npz_path, activations):
    """((mu, sigma) of pool, (mu_s, sigma_s) of spatial): stored in the .npz, as ADM's reference batches
    carry them, else computed from `activations` (as ADM's `read_statistics`)."""
    with np.load(npz_path) as npz:
        def stored_or_computed(mu, sigma, features):
            if mu in npz.files and sigma in npz.files:
                return npz[mu], npz[sigma]
            return compute_statistics(activations[features])

        return stored_or_computed("mu", "sigma", "pool"), stored_or_computed("mu_s", "sigma_s", "spatial")


def _write_atomically(path, arrays):
    """An interrupted run never leaves a half-written cache (and a rerun removes what a killed one was writing);
    a cache that cannot be written is only a warning."""
    remove_temporaries_of(path)
    try:
        with atomic_path(path) as temporary, open(temporary, "wb") as f:
            np.savez(f, **arrays)
    except (OSError, OutputError) as error:  # OutputError: a full disk
        warnings.warn(f"could not write the activation cache {path}: {error}")
