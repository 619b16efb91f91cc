"""Weights left packed between generations (``packed_session(keep=True)``, latentforge.nn.packed; issue 16).

A kept session leaves the layers it swapped out dormant: the packed copy the only copy, the next session
starting from it. References: the float64 convolution written out from its definition (test_packed) and
the module's own weights cloned before any session (bit for bit). A pipeline's second image starting from
the packed weights: test_packed.test_generate_packs_full_size_unets_without_a_second_copy.
"""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch

from latentforge.nn import packed
from latentforge.nn.packed import PackedConv2d
from test_packed import by_definition, small_net

pytestmark = pytest.mark.skipif(not packed.available(), reason="this PyTorch has no oneDNN ops")


def convs(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]


def placeholder_sizes(net):
    """The stored weights' sizes, read without waking anything (``_parameters``, not ``.weight``)."""
    return [m._parameters["weight"].numel() for m in convs(net)]


@pytest.fixture
def reorders(monkeypatch):
    """Counts oneDNN's weight reorders (how packing starts), as packed.py looks them up on every call."""
    count = {"n": 0}
    real = torch.ops.mkldnn._reorder_convolution_weight

    def counting(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight", counting)
    return count


def dormant_net():
    """A small network after one kept session, and the reference values taken before it."""
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 8, 12, 12)
    with torch.inference_mode(), packed.packed_session(net, keep=True):
        first = net(x)
    return net, before, x, first


def test_kept_session_leaves_packed_copies_that_the_next_session_starts_from(reorders):
    net, before, x, first = dormant_net()
    assert reorders["n"] == 3
    # between sessions: packed classes, empty placeholders, the packed copies the only copies
    assert all(type(m) is PackedConv2d for m in convs(net)) and placeholder_sizes(net) == [0, 0, 0]
    assert packed.numel(net) == sum(v.numel() for v in before.values())  # counted at their plain size
    with torch.inference_mode(), packed.packed_session(net, keep=True) as n:
        assert n == 3  # adopted
        again = net(x)
    assert reorders["n"] == 3  # nothing packed again
    assert torch.equal(again, first)
    torch.testing.assert_close(first.double(), by_definition_of(before, x), rtol=1e-4, atol=1e-4)
    with torch.inference_mode(), packed.packed_session(net) as n:  # not kept: everything back at the end
        assert n == 3
        net(x)
    assert all(type(m) is torch.nn.Conv2d for m in convs(net)) and not packed._DORMANT
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def by_definition_of(state, x):
    net = small_net()
    net.load_state_dict(state)
    return by_definition(net, x)


WAKES = {
    "attribute": lambda net: [net[i].weight.sum() for i in (0, 2, 3)],  # each layer woken by its own read
    "call": lambda net: net(torch.randn(1, 8, 12, 12)),
    "state_dict": lambda net: net.state_dict(),
    "load_state_dict": lambda net: net.load_state_dict(small_net().state_dict()),
    "to": lambda net: net.to(torch.float64),
    "deepcopy": lambda net: copy.deepcopy(net),
    "pickle": lambda net: torch.save(net, io.BytesIO()),
    "settle": packed.settle,
    "pack_weights": packed.pack_weights,
    "unpack_weights": packed.unpack_weights,
}


@pytest.mark.parametrize("how", list(WAKES))
def test_anything_outside_a_session_gets_the_plain_weights_back(how):
    net, before, x, _ = dormant_net()
    result = WAKES[how](net)
    # the weights are the loaded ones again, bit for bit, in plain layers (or packed by pack_weights)
    for m in convs(net):
        assert m not in packed._DORMANT and m not in packed._SESSION
        assert type(m) is (PackedConv2d if how == "pack_weights" else torch.nn.Conv2d)
    assert placeholder_sizes(net) == [v.numel() for k, v in before.items() if k.endswith("weight")]
    after = {k: v.to(torch.float32) for k, v in net.state_dict().items()}
    assert all(torch.equal(after[k], before[k]) for k in before)
    if how in ("deepcopy",):
        assert all(torch.equal(result.state_dict()[k], before[k]) for k in before)
    with torch.inference_mode():
        out = net.float()(x)
    torch.testing.assert_close(out.double(), by_definition_of(before, x), rtol=1e-4, atol=1e-4)


def test_reading_inside_a_session_still_fails_loudly():
    net, *_ = dormant_net()
    with torch.inference_mode(), packed.packed_session(net, keep=True), pytest.raises(RuntimeError):
        net[0].weight.view(16, 8, 3, 3)  # adopted by the session: the placeholder, not a silent read
    assert net[0]._parameters["weight"].numel() == 0  # still dormant after it


def test_an_unloaded_model_with_packed_weights_is_freed():
    net, *_ = dormant_net()
    layer = weakref.ref(net[0])
    del net
    gc.collect()
    assert layer() is None  # no table of packed.py keeps a dormant layer (or its packed copy) alive
