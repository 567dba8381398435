"""Classifier guidance: the layer's formula, the noisy-latent classifier's interface, and (on the
shipped classifier) that it steers an unconditional sample of the built-in model."""
import pytest
import torch

from sd_scratch.guidance import ClassifierGuidance, Prediction
from sd_scratch.training.classifier import (ATTRIBUTES, ClassifierConfig, NoisyLatentClassifier, load_classifier,
                                            save_classifier)


def test_the_layer_adds_the_scaled_gradient_of_log_p_to_the_score():
    torch.manual_seed(0)
    x, mu = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    eps, alpha_bar, scale = torch.randn(2, 4, 8, 8), torch.tensor(0.3), 2.5

    def inner(x_t, t, a):
        return Prediction(eps, eps, None, x0=torch.zeros_like(eps))

    def log_prob(x_t, t):  # a Gaussian around mu: ∇ log p = mu − x
        return -0.5 * ((x_t - mu) ** 2).sum(dim=(1, 2, 3))

    out = ClassifierGuidance(inner, log_prob, scale)(x, torch.tensor(500), alpha_bar)
    expected = eps - scale * (1 - alpha_bar) ** 0.5 * (mu - x)  # Dhariwal & Nichol eq. 14, by hand
    torch.testing.assert_close(out.eps, expected)
    assert out.x0 is None  # the sampler must derive x̂₀ from the guided ε


def test_log_prob_is_the_log_softmax_of_the_named_classes_summed():
    torch.manual_seed(1)
    classifier = NoisyLatentClassifier(ClassifierConfig(channels=(32, 64))).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    logits = classifier(x, t)
    assert {a: v.shape for a, v in logits.items()} == {a: (3, len(v)) for a, v in ATTRIBUTES.items()}
    wanted = {"color": "red", "shape": "triangle"}
    by_hand = (logits["color"].log_softmax(-1)[:, ATTRIBUTES["color"].index("red")]
               + logits["shape"].log_softmax(-1)[:, ATTRIBUTES["shape"].index("triangle")])
    torch.testing.assert_close(classifier.log_prob(x, t, wanted), by_hand)
    with pytest.raises(ValueError, match="colour|reads"):
        classifier.log_prob(x, t, {"colour": "red"})
    with pytest.raises(ValueError, match="'magenta' is not one of"):
        classifier.log_prob(x, t, {"color": "magenta"})


def test_a_saved_classifier_loads_with_its_config(tmp_path):
    torch.manual_seed(2)
    classifier = NoisyLatentClassifier(ClassifierConfig(channels=(32, 64))).eval()
    save_classifier(classifier, tmp_path / "c.safetensors")
    loaded = load_classifier(tmp_path / "c.safetensors")
    assert loaded.config == classifier.config
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    for a, v in loaded(x, t).items():  # the file is float16: equal to its rounding
        torch.testing.assert_close(v, classifier(x, t)[a], rtol=2e-2, atol=2e-2)


def test_txt2img_refuses_a_classifier_that_is_not_a_function():
    import sd_scratch

    with pytest.raises(ValueError, match="classifier must be a function log_prob"):
        sd_scratch.load().txt2img("", classifier="red", progress=False)


def test_the_shipped_classifier_steers_the_built_in_models_empty_prompt_to_red():
    import sd_scratch
    from sd_scratch.training import toy_shapes

    sd, judge = sd_scratch.load(), load_classifier()

    def red(scale):
        images = sd.txt2img([""] * 8, guidance_scale=1.0, steps=25, seed=0, progress=False,
                            classifier=lambda x, t: judge.log_prob(x, t, {"color": "red"}), classifier_scale=scale)
        return sum(toy_shapes.analyse(im).color == "red" for im in images)

    unsteered, steered = red(0.0), red(10.0)
    assert steered >= 6 and steered > unsteered  # evaluate_tiny.py: 10% unsteered, 98% at scale 10
