"""ADM's Inception features in PyTorch: the 2015 Inception graph as torch-fidelity ports it (TF-exact resize).

From one forward pass, per image:
- pool:    pool_3, 2048-d (FID, precision / recall);
- spatial: `mixed_6/conv`, first 7 channels, 17x17x7 = 2023-d in (H, W, C) order (sFID);
- softmax: softmax of pool_3 @ W of the 1008-way classifier, without its bias, as ADM's graph computes it (IS).
"""
import os
import pickle

import torch
from torch.hub import download_url_to_file
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from utils.errors import MissingWeightsError, WeightsError
from utils.files import not_a_file
from utils.weights import first_sentence

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_path(path=None):
    """The weights file: `path` if given, else torch hub's checkpoint cache, downloading there when online."""
    if path is not None:
        if not_a_file(path):
            raise MissingWeightsError(f"Inception weights {path}: {not_a_file(path)}")
        return str(path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            download_url_to_file(URL_INCEPTION_V3, cached)
        except OSError as error:
            raise MissingWeightsError(
                f"Inception weights {WEIGHTS_FILE} are not in {os.path.dirname(cached)} and could not be "
                f"downloaded ({error}). Fetch {URL_INCEPTION_V3} on a machine with internet, then pass "
                f"--inception-weights PATH or copy the file to {cached}."
            ) from error
    return cached


class InceptionFeatures:
    """uint8 images (N, H, W, 3) of any size → dict of float32 arrays `pool`, `spatial`, `softmax`."""

    def __init__(self, weights_path, device="cpu"):
        self.device = device
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
            ).to(device)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # torch.load of the file
            raise WeightsError(f"Inception weights {weights_path} are unreadable (truncated or corrupt?): "
                               f"{first_sentence(error)}; fetch {URL_INCEPTION_V3} again") from None
        # TF's `mixed_6/conv` is the ReLU output of Mixed_6d's 1x1 branch.
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.weights_path = weights_path  # activation caches record which weights made them

    def _keep_spatial(self, module, inputs, output):
        # NCHW → NHWC before flattening, the order of TF's output and of the reference batch's mu_s / sigma_s.
        self._spatial = output[:, :7].permute(0, 2, 3, 1).flatten(1)

    @torch.no_grad()
    def __call__(self, images):
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)
        # Full float32 convolutions: cuDNN's default TF32 would make the features depend on the GPU model.
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            pool, logits = self.net(x)
        return {
            "pool": pool.cpu().numpy(),
            "spatial": self._spatial.float().cpu().numpy(),
            "softmax": torch.softmax(logits, dim=1).cpu().numpy(),
        }
