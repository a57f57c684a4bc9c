"""The parameter facts shared by decoding, adapters and the MoE loss."""

import torch
from torch import nn

from lab.params import model_device, weights_version


def test_model_device_of_a_model_without_parameters_is_the_cpu():
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")


def test_weights_version_changes_with_in_place_updates_and_replacements():
    layer = nn.Linear(3, 3)
    before = weights_version(layer)
    assert weights_version(layer) == before
    with torch.no_grad():
        layer.weight.add_(1.0)
    updated = weights_version(layer)
    assert updated != before
    layer.bias = nn.Parameter(torch.zeros(3))
    assert weights_version(layer) != updated
