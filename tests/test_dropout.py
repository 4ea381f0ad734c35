"""Dropout with a cheaper mask (kernels/dropout.py): the rate, the scaling, the gradient, the seed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from speedyrec.kernels.dropout import FastDropout, fast_dropout, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drops_about_p_and_scales_the_rest_to_keep_the_mean(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = fast_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-4)
    assert abs(y.mean().item() - 1.0) < 0.02  # the expectation of each element is kept


def test_the_gradient_is_the_mask_times_the_scale_and_bf16_works():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    y = fast_dropout(x, 0.25)
    y.sum().backward()
    mask = y != 0
    torch.testing.assert_close(x.grad, mask.float() / (1 - 0.25), rtol=1e-4, atol=0)
    out = fast_dropout(torch.randn(8, 16, dtype=torch.bfloat16), 0.1)
    assert out.dtype == torch.bfloat16 and out.shape == (8, 16)


def test_a_seed_fixes_the_masks_and_calls_differ():
    x = torch.ones(1000)
    torch.manual_seed(7)
    a, b = fast_dropout(x, 0.5), fast_dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(fast_dropout(x, 0.5), a) and not torch.equal(a, b)


def test_identity_when_not_training_or_p_zero():
    x = torch.randn(10)
    assert fast_dropout(x, 0.5, training=False) is x and fast_dropout(x, 0.0) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros(10))


def test_modules_are_swapped_in_place_and_state_dicts_do_not_change():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.3), nn.ReLU()))
    keys = set(model.state_dict())
    assert use_fast_dropout(model) == 2
    assert [m.p for m in model.modules() if isinstance(m, FastDropout)] == [0.2, 0.3]
    assert set(model.state_dict()) == keys
    model.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), torch.relu(model[0](x)))


def test_drawing_the_mask_is_not_a_host_device_sync():
    """The mask's seed is read from torch's CPU generator, a host tensor in every run: the sync counter of the
    training step (engine/host_sync.py) sees no call, while a plain int() of a tensor is still counted."""
    from speedyrec.engine.host_sync import count_host_syncs

    x = torch.randn(16, 8)
    with count_host_syncs() as counts:
        fast_dropout(x, 0.1)
    assert sum(counts.values()) == 0
    with count_host_syncs() as counts:
        int(torch.randint(0, 9, (1,)))
    assert counts["Tensor.__int__"] == 1
