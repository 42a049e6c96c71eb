"""cbn.convert: checkpoint names and momentum between PyTorch and MindSpore."""

import numpy as np
import pytest

import cbn
import cbn.mindspore as ms
from cbn import convert

TORCH_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
MS_BN = ("moving_mean", "moving_variance", "gamma", "beta")


def torch_state(rng, prefix, c=3, count=0):
    state = {prefix + name: rng.standard_normal(c).astype(np.float32) for name in TORCH_BN[:4]}
    state[prefix + "num_batches_tracked"] = np.array(count, np.int64)
    return state


def network_state(rng):
    """A ResNet-like state: convolutions, nested batch norms, a linear layer, a bare layer."""
    state = {"conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    state.update(torch_state(rng, "bn1."))
    state["layer1.0.conv1.weight"] = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    state.update(torch_state(rng, "layer1.0.bn1.", count=7))
    state.update(torch_state(rng, "layer1.0.downsample.1.", count=7))
    state["fc.weight"] = rng.standard_normal((2, 4)).astype(np.float32)
    state["fc.bias"] = rng.standard_normal(2).astype(np.float32)
    return state


# --- names ------------------------------------------------------------------------

def test_torch_to_mindspore_renames_one_layer(rng):
    state = torch_state(rng, "", count=5)
    params = convert.torch_to_mindspore(state)
    assert list(params) == ["gamma", "beta", "moving_mean", "moving_variance"]
    for pt, name in zip(TORCH_BN, ("gamma", "beta", "moving_mean", "moving_variance")):
        np.testing.assert_array_equal(params[name], state[pt])
        assert not np.shares_memory(params[name], state[pt]), "values must be copies"


def test_mindspore_to_torch_renames_and_adds_num_batches_tracked(rng):
    params = {name: rng.standard_normal(3).astype(np.float32) for name in MS_BN}
    state = convert.mindspore_to_torch(params)
    assert list(state) == ["running_mean", "running_var", "weight", "bias",
                           "num_batches_tracked"]
    for name, pt in zip(MS_BN, ("running_mean", "running_var", "weight", "bias")):
        np.testing.assert_array_equal(state[pt], params[name])
        assert not np.shares_memory(state[pt], params[name]), "values must be copies"
    assert state["num_batches_tracked"].shape == ()
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"] == 0


def test_nested_prefixes_are_kept_and_other_keys_pass_through(rng):
    state = network_state(rng)
    params = convert.torch_to_mindspore(state)
    assert list(params) == [
        "conv1.weight",
        "bn1.gamma", "bn1.beta", "bn1.moving_mean", "bn1.moving_variance",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.gamma", "layer1.0.bn1.beta",
        "layer1.0.bn1.moving_mean", "layer1.0.bn1.moving_variance",
        "layer1.0.downsample.1.gamma", "layer1.0.downsample.1.beta",
        "layer1.0.downsample.1.moving_mean", "layer1.0.downsample.1.moving_variance",
        "fc.weight", "fc.bias",
    ]
    for key in ("conv1.weight", "layer1.0.conv1.weight", "fc.weight", "fc.bias"):
        assert params[key] is state[key], f"{key} must pass through unchanged"
    np.testing.assert_array_equal(params["layer1.0.bn1.moving_variance"],
                                  state["layer1.0.bn1.running_var"])


def test_round_trip_on_nested_prefixes(rng):
    state = network_state(rng)
    back = convert.mindspore_to_torch(convert.torch_to_mindspore(state))
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert back[key] == 0, "MindSpore keeps no count: it comes back as a new layer's 0"
        else:
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    # The batch-norm keys come back in PyTorch's own order, right after the layer's others.
    assert list(back)[1:6] == ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                               "bn1.num_batches_tracked"]


def test_mindspore_round_trip_on_nested_prefixes(rng):
    params = {}
    for prefix in ("backbone.bn.", "backbone.stage2.0.bn2.", "head.norm."):
        params.update({prefix + name: rng.standard_normal(3) for name in MS_BN})
    params["head.ln.gamma"] = rng.standard_normal(3)  # a LayerNorm: no moving statistics
    params["head.ln.beta"] = rng.standard_normal(3)
    params["learning_rate"] = np.array(0.1)
    state = convert.mindspore_to_torch(params)
    assert "head.ln.gamma" in state and "head.ln.weight" not in state
    assert "head.ln.num_batches_tracked" not in state
    assert state["learning_rate"] is params["learning_rate"]
    assert state["backbone.stage2.0.bn2.running_var"] is not params[
        "backbone.stage2.0.bn2.moving_variance"]
    back = convert.torch_to_mindspore(state)
    assert list(back) == list(params)
    for key, value in params.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_a_convolution_weight_is_never_renamed(rng):
    """A prefix is a batch norm only if it holds running statistics."""
    state = {"conv.weight": np.ones((2, 2)), "conv.bias": np.zeros(2), "weight": np.ones(2)}
    assert convert.torch_to_mindspore(state) == state
    params = {"gamma": np.ones(2), "beta": np.zeros(2), "dense.weight": np.ones((2, 2))}
    assert convert.mindspore_to_torch(params) == params


def test_an_existing_num_batches_tracked_is_kept(rng):
    params = {name: np.ones(2) for name in MS_BN}
    params["num_batches_tracked"] = np.array(9)
    assert convert.mindspore_to_torch(params)["num_batches_tracked"] == 9


def test_two_names_for_one_array_raise(rng):
    state = torch_state(rng, "bn.")
    state["bn.gamma"] = np.ones(3)
    with pytest.raises(ValueError, match="'bn.weight' and 'bn.gamma' both map to 'bn.gamma'|"
                                         "'bn.gamma' and 'bn.weight' both map to 'bn.gamma'"):
        convert.torch_to_mindspore(state)


def test_torch_tensors_convert_to_numpy(torch):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    params = convert.torch_to_mindspore(model.state_dict())
    assert set(params) == {"0.weight", "0.bias", "1.gamma", "1.beta", "1.moving_mean",
                           "1.moving_variance"}
    assert isinstance(params["1.gamma"], np.ndarray)
    np.testing.assert_array_equal(params["1.moving_variance"], np.ones(4))


# --- a converted PyTorch model in the MindSpore layers ----------------------------

def test_converted_torch_state_reproduces_torchs_eval_output(torch, rng):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.3))
    model.train()
    for _ in range(3):
        model(torch.from_numpy(rng.standard_normal((5, 3, 4, 4)).astype(np.float32)))
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 4).astype(np.float32)))
        model[1].bias.copy_(torch.from_numpy(rng.uniform(-1, 1, 4).astype(np.float32)))
    model.eval()

    params = convert.torch_to_mindspore(model.state_dict())
    layer = ms.BatchNorm2d(4, momentum=convert.momentum_torch_to_mindspore(model[1].momentum))
    layer.load_parameters({key[len("1."):]: value for key, value in params.items()
                           if key.startswith("1.")})
    assert layer.momentum == pytest.approx(0.7)
    features = model[0](torch.from_numpy(rng.standard_normal((2, 3, 4, 4)).astype(np.float32)))
    expected = model[1](features).detach().numpy()
    actual = layer(features.detach().numpy())  # a new MindSpore layer infers
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-6 * np.abs(expected).max())

    # ... and back: PyTorch loads the MindSpore parameters of that layer.
    state = convert.mindspore_to_torch({"1." + k: v for k, v in layer.parameters_dict().items()})
    fresh = torch.nn.BatchNorm2d(4)
    fresh.load_state_dict({key[len("1."):]: torch.from_numpy(np.asarray(value))
                           for key, value in state.items()})
    fresh.eval()
    np.testing.assert_array_equal(fresh(features).detach().numpy(), expected)


def test_cbn_layers_load_each_others_converted_states(rng):
    pt = cbn.BatchNorm1d(3, momentum=0.2)
    pt(rng.standard_normal((6, 3)).astype(np.float32))
    pt.eval()
    layer = ms.BatchNorm1d(3)
    layer.load_parameters(convert.torch_to_mindspore(pt.state_dict()))
    x = rng.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), pt(x))
    again = cbn.BatchNorm1d(3).eval()
    again.load_state_dict(convert.mindspore_to_torch(layer.parameters_dict()))
    np.testing.assert_array_equal(again(x), pt(x))


# --- momentum -----------------------------------------------------------------------

@pytest.mark.parametrize("torch_momentum, ms_momentum", [
    (0.1, 0.9), (0.25, 0.75), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5),
])
def test_momentum_conversions_are_complements(torch_momentum, ms_momentum):
    assert convert.momentum_torch_to_mindspore(torch_momentum) == pytest.approx(ms_momentum)
    assert convert.momentum_mindspore_to_torch(ms_momentum) == pytest.approx(torch_momentum)
    assert convert.momentum_mindspore_to_torch(
        convert.momentum_torch_to_mindspore(torch_momentum)) == pytest.approx(torch_momentum)


def test_momentum_none_has_no_mindspore_equivalent():
    with pytest.raises(ValueError, match="cumulative moving average"):
        convert.momentum_torch_to_mindspore(None)


@pytest.mark.parametrize("momentum", [-0.1, 1.1, "0.1", True, float("nan")])
@pytest.mark.parametrize("function", [convert.momentum_torch_to_mindspore,
                                      convert.momentum_mindspore_to_torch])
def test_momentum_outside_zero_one_raises(function, momentum):
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\]"):
        function(momentum)


# --- MindSpore's BatchNorm3d: the bn2d. infix ---------------------------------------------

def ms3d_params(rng, prefix):
    return {prefix + "bn2d." + name: rng.standard_normal(3).astype(np.float32)
            for name in MS_BN}


def test_mindspore_batchnorm3d_names_map_to_torchs(rng):
    params = {"conv.weight": np.ones((3, 3, 1, 1, 1), np.float32)}
    params.update(ms3d_params(rng, "layer1.bn."))
    params.update(ms3d_params(rng, ""))             # a bare BatchNorm3d's checkpoint
    params.update({"bn2.gamma": np.ones(3), "bn2.moving_mean": np.zeros(3),
                   "bn2.moving_variance": np.ones(3), "bn2.beta": np.zeros(3)})
    state = convert.mindspore_to_torch(params)
    assert list(state) == [
        "conv.weight",
        "layer1.bn.running_mean", "layer1.bn.running_var", "layer1.bn.weight", "layer1.bn.bias",
        "layer1.bn.num_batches_tracked",
        "running_mean", "running_var", "weight", "bias", "num_batches_tracked",
        "bn2.weight", "bn2.running_mean", "bn2.running_var", "bn2.bias",
        "bn2.num_batches_tracked",
    ]
    np.testing.assert_array_equal(state["layer1.bn.running_var"],
                                  params["layer1.bn.bn2d.moving_variance"])
    kept = convert.mindspore_to_torch(ms3d_params(rng, "net."), batchnorm3d=False)
    assert "net.bn2d.weight" in kept


def test_torch_batchnorm3d_names_map_to_mindspores_and_back(rng):
    state = torch_state(rng, "layer1.bn.")
    state.update(torch_state(rng, "layer2.bn."))
    params = convert.torch_to_mindspore(state, batchnorm3d=["layer1.bn"])
    assert [k for k in params if k.startswith("layer1")] == [
        "layer1.bn.bn2d.gamma", "layer1.bn.bn2d.beta", "layer1.bn.bn2d.moving_mean",
        "layer1.bn.bn2d.moving_variance"]
    assert "layer2.bn.gamma" in params  # not said to be 3d: a BatchNorm2d's names
    back = convert.mindspore_to_torch(params)
    assert sorted(back) == sorted(state)
    np.testing.assert_array_equal(back["layer1.bn.weight"], state["layer1.bn.weight"])
    bare = convert.torch_to_mindspore(torch_state(rng, ""), batchnorm3d=[""])
    assert list(bare) == ["bn2d.gamma", "bn2d.beta", "bn2d.moving_mean", "bn2d.moving_variance"]


def test_cbn_mindspore_batchnorm3d_round_trips_through_torch_names(rng):
    layer = ms.BatchNorm3d(3, momentum=0.8).set_train()
    layer(rng.standard_normal((2, 3, 2, 2, 2)).astype(np.float32))
    pt = cbn.BatchNorm3d(3).eval()
    pt.load_state_dict(convert.mindspore_to_torch(layer.parameters_dict()))
    x = rng.standard_normal((2, 3, 2, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(pt(x), layer.set_train(False)(x))
    again = ms.BatchNorm3d(3)
    again.load_parameters(convert.torch_to_mindspore(pt.state_dict(), batchnorm3d=[""]))
    np.testing.assert_array_equal(again(x), layer(x))


def test_torch_model_tells_which_layers_are_3d(torch, rng):
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 1), torch.nn.BatchNorm3d(3),
                                torch.nn.Flatten(), torch.nn.BatchNorm1d(3 * 8))
    model.train()
    model(torch.from_numpy(rng.standard_normal((4, 2, 2, 2, 2)).astype(np.float32)))
    params = convert.torch_to_mindspore(model.state_dict(), batchnorm3d=model)
    assert "1.bn2d.moving_mean" in params and "3.moving_mean" in params
    layer = ms.BatchNorm3d(3)
    layer.load_parameters({k[len("1."):]: v for k, v in params.items() if k.startswith("1.")})
    np.testing.assert_array_equal(layer.moving_mean, model[1].running_mean.numpy())
    # ... and back into torch.
    fresh = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 1), torch.nn.BatchNorm3d(3),
                                torch.nn.Flatten(), torch.nn.BatchNorm1d(3 * 8))
    fresh.load_state_dict(convert.to_torch_state_dict(convert.mindspore_to_torch(params)))
    np.testing.assert_array_equal(fresh[1].running_var.numpy(), model[1].running_var.numpy())
