"""Every registered model is one Opacus accepts, and weights round-trip by name."""

import numpy as np
import pytest
from opacus.validators import ModuleValidator

from common.models import MODELS, build_model, get_weights, set_weights


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_passes_opacus_strict_validation(name):
    model = build_model(name, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []  # no BatchNorm and the like


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seeded_init_is_reproducible_and_weights_round_trip(name):
    a, b = build_model(name, seed=1), build_model(name, seed=1)
    wa, wb = get_weights(a), get_weights(b)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    c = build_model(name, seed=2)
    set_weights(c, wa)
    assert all(np.array_equal(get_weights(c)[k], wa[k]) for k in wa)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="model='resnet'"):
        build_model("resnet")


def test_evaluation_loss_is_the_cross_entropy():
    import torch

    from common.models import build_model, evaluate

    rng = np.random.default_rng(0)
    images = rng.normal(size=(300, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, size=300)
    model = build_model("cnn", seed=2)
    loss, acc = evaluate(model, images, labels, batch_size=128)
    with torch.no_grad():
        out = model(torch.from_numpy(images))
        want = float(torch.nn.functional.cross_entropy(out, torch.from_numpy(labels)))
        want_acc = float((out.argmax(1) == torch.from_numpy(labels)).float().mean())
    assert loss == pytest.approx(want, rel=1e-5) and acc == pytest.approx(want_acc)
