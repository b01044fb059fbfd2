"""The embedded toy data set, its classifier and the patch k-means tokenizer."""

import pytest
import torch

from modeling.tokenizers import build_tokenizer
from modeling.tokenizers.toy import PatchKMeansTokenizer
from utils.config import load_config
from utils.data.toy import ToyClassifier, toy_images

TOY = "configs/rear_toy.yaml"


@pytest.fixture(scope="module")
def toy():
    return toy_images(1500, 10, 32, seed=0)


def test_toy_images_are_seeded_and_balanced(toy):
    images, labels = toy
    again, labels_again = toy_images(1500, 10, 32, seed=0)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(toy_images(20, 10, 32, seed=1)[0], images[:20])
    assert images.shape == (1500, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert torch.bincount(labels).tolist() == [150] * 10


def test_classifier_tells_the_classes_apart(toy):
    images, labels = toy
    classifier = ToyClassifier.fit(images, labels, 10)
    test_images, test_labels = toy_images(1000, 10, 32, seed=5)
    assert classifier.share_correct(test_images, test_labels) >= 0.97
    assert classifier.share_correct(test_images, (test_labels + 1) % 10) <= 0.02


def test_tokenizer_round_trip_and_codebook_features(toy):
    images, _ = toy
    tokenizer = PatchKMeansTokenizer(codebook_size=64, patch_size=4, image_size=32).fit(images[:500], iterations=10)
    tokens = tokenizer.encode(images[:8])
    assert tokens.shape == (8, 64) and tokens.dtype == torch.long
    decoded = tokenizer.decode_tokens(tokens)
    assert torch.equal(tokenizer.encode(decoded), tokens)  # codebook entries are fixed points
    assert (decoded - images[:8]).pow(2).mean() < 0.01
    features = tokenizer.get_quantized_states(tokens)
    assert features.shape == (8, 64, 48)
    assert torch.equal(features[0, 9].view(3, 4, 4), decoded[0, :, 4:8, 4:8])  # token 9: row 1, column 1
    with pytest.raises(ValueError, match=r"token 64 is outside the codebook range \[0, 64\)"):
        tokenizer.get_quantized_states(torch.tensor([[64]]))


def test_build_tokenizer_fits_from_the_config_or_loads_a_checkpoint(tmp_path):
    from utils.data.toy import tokenizer_fit_images
    from utils.errors import MissingWeightsError

    config = load_config(TOY, ["dataset.toy.num_images=300"])
    with pytest.raises(MissingWeightsError, match="training fits it .* experiment.tokenizer_checkpoint="):
        build_tokenizer(config)  # only training fits it; everything else loads the fitted one
    tokenizer = build_tokenizer(config, fit_images=tokenizer_fit_images(config))
    assert (tokenizer.codebook_size, tokenizer.token_size) == (64, 48)
    refit = build_tokenizer(config, fit_images=tokenizer_fit_images(config))
    assert torch.equal(refit.codebook, tokenizer.codebook)  # same seed, same codebook
    from safetensors.torch import save_file

    save_file(tokenizer.state_dict(), str(tmp_path / "tok.safetensors"))
    loaded = build_tokenizer(load_config(TOY, [f"experiment.tokenizer_checkpoint={tmp_path / 'tok.safetensors'}"]))
    assert torch.equal(loaded.codebook, tokenizer.codebook)
    save_file({"codebook": torch.zeros(32, 48)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch: codebook: checkpoint \(32, 48\) vs model \(64, 48\)"):
        build_tokenizer(load_config(TOY, [f"experiment.tokenizer_checkpoint={tmp_path / 'wrong.safetensors'}"]))
    with pytest.raises(ValueError, match="token_size' is 12 but the 'toy' tokenizer has 48"):
        config = load_config(TOY, ["model.vq_model.token_size=12", "dataset.toy.num_images=300"])
        build_tokenizer(config, fit_images=tokenizer_fit_images(config))
