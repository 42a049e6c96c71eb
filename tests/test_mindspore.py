"""cbn.mindspore: MindSpore's BatchNorm1d/2d/3d on the shared core.

The expectations come from three places: the MindSpore examples of the seed
documents (../shared/seeds/001-003) with their printed outputs, the moving
statistics measured on MindSpore 2.10 (../shared/reference/anchors.md), and
``ms_reference`` below, MindSpore's rule written out in float64:

    moving = momentum * moving + (1 - momentum) * batch   (unbiased variance)
"""

import numpy as np
import pytest

import cbn
import cbn.mindspore as ms

PRINTED_ATOL = 2e-6  # the seed prints are float32 noise; see test_seeds.py
TOL = 2e-6           # float32 results against the float64 reference, relative to max(|ref|, 1)

CLASSES = {1: ms.BatchNorm1d, 2: ms.BatchNorm2d, 3: ms.BatchNorm3d}
TORCH_CLASSES = {1: cbn.BatchNorm1d, 2: cbn.BatchNorm2d, 3: cbn.BatchNorm3d}
SHAPES = [
    pytest.param(ms.BatchNorm1d, (8, 3), id="1d-NC"),
    pytest.param(ms.BatchNorm1d, (4, 3, 5), id="1d-NCL"),
    pytest.param(ms.BatchNorm2d, (3, 4, 5, 6), id="2d"),
    pytest.param(ms.BatchNorm3d, (2, 3, 4, 3, 5), id="3d"),
]
MS_NAMES = ["moving_mean", "moving_variance", "gamma", "beta"]


# --- helpers ------------------------------------------------------------------

def make_input(rng, shape, dtype=np.float32, channel_axis=1):
    channels = shape[channel_axis]
    bshape = [1] * len(shape)
    bshape[channel_axis] = channels
    offsets = rng.uniform(-3, 3, channels).reshape(bshape)
    spreads = rng.uniform(0.5, 2.0, channels).reshape(bshape)
    return (offsets + spreads * rng.standard_normal(shape)).astype(dtype)


def randomise(layer, rng):
    """Parameters and moving statistics that are not the defaults."""
    c = layer.num_features
    layer.gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c)
    layer.beta = rng.uniform(-1, 1, c)
    layer.moving_mean = rng.uniform(-1, 1, c)
    layer.moving_variance = rng.uniform(0.5, 2.0, c)
    return layer


def ms_reference(x, layer, use_batch):
    """(y, new moving_mean, new moving_variance) of MindSpore's rule in float64."""
    x = np.asarray(x, np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    moving_mean = layer.moving_mean.astype(np.float64)
    moving_var = layer.moving_variance.astype(np.float64)
    if use_batch:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        n = x.size // x.shape[1]
        m = layer.momentum
        new_mean = m * moving_mean + (1 - m) * mean
        new_var = m * moving_var + (1 - m) * var * n / (n - 1)
    else:
        mean, var = moving_mean, moving_var
        new_mean, new_var = moving_mean, moving_var
    gamma, beta = layer.gamma.astype(np.float64), layer.beta.astype(np.float64)
    y = (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + layer.eps)
    return y * gamma.reshape(bshape) + beta.reshape(bshape), new_mean, new_var


def assert_close(actual, expected, what, tol=TOL):
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1.0)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0,
                               atol=tol * scale, err_msg=what)


def snapshot(layer):
    state = {name: np.array(getattr(layer, name)) for name in MS_NAMES}
    for name in ("grad_gamma", "grad_beta"):
        value = getattr(layer, name)
        state[name] = None if value is None else value.copy()
    state["training"] = layer.training
    state["use_batch_statistics"] = layer.use_batch_statistics
    state["momentum"], state["eps"] = layer.momentum, layer.eps
    return state


def assert_same_state(before, layer):
    for key, value in snapshot(layer).items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, before[key], equal_nan=True), f"{key} changed"
        else:
            assert value == before[key], f"{key} changed: {before[key]!r} -> {value!r}"


def used_layer(cls, shape, rng, data_format="NCHW"):
    """A randomised training layer after one forward and backward on ``shape``."""
    axis = -1 if data_format == "NHWC" else 1
    kwargs = {} if cls is ms.BatchNorm3d else {"data_format": data_format}
    layer = randomise(cls(shape[axis], **kwargs), rng).set_train()
    layer(make_input(rng, shape, channel_axis=axis))
    layer.backward(rng.standard_normal(shape))
    return layer


# --- the seeds' MindSpore examples ------------------------------------------------

def test_seed_001_batchnorm1d():
    net = ms.BatchNorm1d(num_features=4, affine=False, momentum=0.9)
    net.set_train()
    x = np.array([[0.7, 0.5, 0.5, 0.6], [0.5, 0.4, 0.6, 0.9]]).astype(np.float32)
    output = net(x)
    printed = np.array([[0.9995001, 0.9980063, -0.998006, -0.9997778],
                        [-0.9995007, -0.9980057, 0.998006, 0.9997778]])
    assert output.dtype == np.float32 and output.shape == (2, 4)
    np.testing.assert_allclose(output, printed, rtol=0, atol=PRINTED_ATOL)
    # Measured on MindSpore 2.10 (anchors.md): 0.9 * 1 + 0.1 * unbiased batch variance.
    np.testing.assert_allclose(net.moving_variance, [0.902, 0.9005, 0.9005, 0.9045], rtol=1e-6)
    np.testing.assert_allclose(net.moving_mean, [0.06, 0.045, 0.055, 0.075], rtol=1e-6)


def test_seed_002_batchnorm2d():
    m = ms.BatchNorm2d(num_features=3, momentum=0.9)
    m.set_train()
    input_ms = np.array([[[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6], [0.7, 0.8]],
                          [[0.9, 1], [1.1, 1.2]]]]).astype(np.float32)
    output = m(input_ms)
    printed = np.array([[[[-1.3411045, -0.4470348], [0.44703496, 1.3411045]],
                         [[-1.341105, -0.4470351], [0.44703424, 1.3411041]],
                         [[-1.3411034, -0.44703388], [0.44703573, 1.3411053]]]])
    assert output.dtype == np.float32 and output.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(output, printed, rtol=0, atol=PRINTED_ATOL)
    # Means 0.25, 0.65, 1.05; every channel's unbiased variance is 1/60.
    np.testing.assert_allclose(m.moving_mean, [0.025, 0.065, 0.105], rtol=1e-6)
    np.testing.assert_allclose(m.moving_variance, [0.9 + 0.1 / 60] * 3, rtol=1e-6)


def test_seed_003_batchnorm3d():
    m = ms.BatchNorm3d(num_features=2, momentum=0.9)
    m.set_train()
    input_x = np.array([[[[[0.1, 0.2], [0.3, 0.4]]],
                         [[[0.9, 1], [1.1, 1.2]]]]]).astype(np.float32)
    output = m(input_x)
    printed = np.array([[[[[-1.3411044, -0.44703478], [0.4470349, 1.3411044]]],
                         [[[-1.3411039, -0.44703427], [0.44703534, 1.341105]]]]])
    assert output.dtype == np.float32 and output.shape == (1, 2, 1, 2, 2)
    np.testing.assert_allclose(output, printed, rtol=0, atol=PRINTED_ATOL)
    np.testing.assert_allclose(m.moving_mean, [0.025, 0.105], rtol=1e-6)
    np.testing.assert_allclose(m.moving_variance, [0.9 + 0.1 / 60] * 2, rtol=1e-6)


def test_seed_example_before_set_train_uses_the_moving_statistics():
    """MindSpore's difference 2: a new layer infers; moving stats 0 and 1 give x / sqrt(1 + eps)."""
    net = ms.BatchNorm1d(num_features=4, affine=False, momentum=0.9)
    x = np.array([[0.7, 0.5, 0.5, 0.6], [0.5, 0.4, 0.6, 0.9]]).astype(np.float32)
    np.testing.assert_allclose(net(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(net.moving_mean, np.zeros(4))
    np.testing.assert_array_equal(net.moving_variance, np.ones(4))


# --- the mode tables of the seeds ------------------------------------------------

# MindSpore's table: use_batch_statistics x the training flag.
MS_MODES = [
    # use_batch_statistics, training, uses and updates batch statistics
    pytest.param(None, True, True, id="None-train: batch statistics, moving updated"),
    pytest.param(None, False, False, id="None-infer: moving statistics, not updated"),
    pytest.param(True, True, True, id="True-train: batch statistics, moving updated"),
    pytest.param(True, False, True, id="True-infer: batch statistics, moving still updated"),
    pytest.param(False, True, False, id="False-train: moving statistics, never updated"),
    pytest.param(False, False, False, id="False-infer: moving statistics, never updated"),
]


@pytest.mark.parametrize("use_batch_statistics, training, use_batch", MS_MODES)
@pytest.mark.parametrize("cls, shape", SHAPES)
def test_mindspore_mode_table(rng, cls, shape, use_batch_statistics, training, use_batch):
    layer = randomise(cls(shape[1], momentum=0.8, use_batch_statistics=use_batch_statistics),
                      rng).set_train(training)
    x = make_input(rng, shape)
    y_ref, mean_ref, var_ref = ms_reference(x, layer, use_batch)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert_close(y, y_ref, "output")
    assert_close(layer.moving_mean, mean_ref, "moving_mean")
    assert_close(layer.moving_variance, var_ref, "moving_variance")
    assert layer.training is training


# PyTorch's table: (training, track_running_stats), and the MindSpore layer
# that cbn.convert's layer path makes of each state.
TORCH_MODES = [
    # training, track, uses batch statistics, updates running statistics
    pytest.param(True, True, True, True, id="train-track: batch statistics, running updated"),
    pytest.param(True, False, True, False, id="train-notrack: batch statistics, no running"),
    pytest.param(False, True, False, False, id="eval-track: running statistics, not updated"),
    pytest.param(False, False, True, False, id="eval-notrack: batch statistics, no running"),
]


@pytest.mark.parametrize("training, track, use_batch, updates", TORCH_MODES)
def test_torch_mode_table_and_its_mindspore_equivalent(rng, training, track, use_batch, updates):
    shape = (4, 3, 5, 2)
    layer = cbn.BatchNorm2d(3, momentum=0.25, track_running_stats=track).train(training)
    layer.weight[...] = rng.uniform(0.5, 2, 3)
    layer.bias[...] = rng.uniform(-1, 1, 3)
    if track:
        layer.running_mean[...] = rng.uniform(-1, 1, 3)
        layer.running_var[...] = rng.uniform(0.5, 2, 3)
    twin = ms.BatchNorm2d.from_torch(layer)
    assert twin.use_batch_statistics is (None if track else True)
    x = make_input(rng, shape)
    before = twin.parameters_dict()
    y_ref, mean_ref, var_ref = ms_reference(x, twin, use_batch)

    y = layer(x)
    assert_close(y, y_ref, "PyTorch-flavoured output")
    if track:
        assert_close(layer.running_mean, mean_ref if updates else before["moving_mean"],
                     "running_mean")
        assert_close(layer.running_var, var_ref if updates else before["moving_variance"],
                     "running_var")
    else:
        assert layer.running_mean is None and layer.running_var is None
    np.testing.assert_array_equal(twin(x), y)


# --- the same data through both flavours ------------------------------------------

@pytest.mark.parametrize("momentum", [0.25, 0.0, 1.0, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pytorch_and_mindspore_flavours_agree(rng, momentum, dtype):
    """Bit for bit, unless 1 - (1 - m) != m in binary (m = 0.1): then to a few roundings."""
    if 1 - (1 - momentum) == momentum:
        same = np.testing.assert_array_equal
    else:
        def same(actual, desired, err_msg=""):
            atol = 4 * np.finfo(dtype).eps * max(np.max(np.abs(desired)), 1.0)
            np.testing.assert_allclose(actual, desired, rtol=0, atol=atol, err_msg=err_msg)
    shape = (4, 3, 5, 6)
    pt = cbn.BatchNorm2d(3, momentum=momentum, dtype=dtype)
    params = {"gamma": rng.uniform(0.5, 2, 3), "beta": rng.uniform(-1, 1, 3),
              "moving_mean": rng.uniform(-1, 1, 3), "moving_variance": rng.uniform(0.5, 2, 3)}
    msl = ms.BatchNorm2d(3, momentum=1 - momentum, dtype=dtype,
                         **{("moving_var" if k == "moving_variance" else k) + "_init": v
                            for k, v in params.items()})
    pt.load_state_dict(cbn.convert.mindspore_to_torch(params))
    msl.set_train()
    for step in range(4):
        x = make_input(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        np.testing.assert_array_equal(msl(x), pt(x), err_msg=f"output, step {step}")
        np.testing.assert_array_equal(msl.backward(dy), pt.backward(dy), err_msg=f"dx, step {step}")
        np.testing.assert_array_equal(msl.grad_gamma, pt.grad_weight)
        np.testing.assert_array_equal(msl.grad_beta, pt.grad_bias)
        same(msl.moving_mean, pt.running_mean, err_msg=f"moving_mean, step {step}")
        same(msl.moving_variance, pt.running_var, err_msg=f"moving_variance, step {step}")
    msl.set_train(False)
    pt.eval()
    x = make_input(rng, shape, dtype)
    same(msl(x), pt(x), err_msg="inference output")
    dy = rng.standard_normal(shape).astype(dtype)
    same(msl.backward(dy), pt.backward(dy), err_msg="inference dx")


NHWC_SHAPES = [
    pytest.param(ms.BatchNorm1d, (7, 3), id="1d-NC"),
    pytest.param(ms.BatchNorm1d, (4, 5, 3), id="1d-NLC"),
    pytest.param(ms.BatchNorm2d, (3, 4, 5, 6), id="2d-NHWC"),
]


@pytest.mark.parametrize("use_batch_statistics", [None, True, False])
@pytest.mark.parametrize("cls, shape", NHWC_SHAPES)
def test_nhwc_equals_nchw_transposed(rng, cls, shape, use_batch_statistics):
    channels = shape[-1]
    nhwc = cls(channels, data_format="NHWC", use_batch_statistics=use_batch_statistics)
    nchw = cls(channels, use_batch_statistics=use_batch_statistics)
    nchw.load_parameters(randomise(nhwc, rng).parameters_dict())
    nhwc.set_train()
    nchw.set_train()
    for _ in range(2):
        x = make_input(rng, shape, channel_axis=-1)
        dy = rng.standard_normal(shape).astype(np.float32)
        y = nhwc(x)
        assert y.shape == x.shape and y.flags.c_contiguous
        np.testing.assert_array_equal(y, np.moveaxis(nchw(np.moveaxis(x, -1, 1)), 1, -1))
        dx = nhwc.backward(dy)
        assert dx.shape == x.shape
        np.testing.assert_array_equal(dx, np.moveaxis(nchw.backward(np.moveaxis(dy, -1, 1)), 1, -1))
        np.testing.assert_array_equal(nhwc.grad_gamma, nchw.grad_gamma)
        np.testing.assert_array_equal(nhwc.grad_beta, nchw.grad_beta)
        for name in MS_NAMES:
            np.testing.assert_array_equal(getattr(nhwc, name), getattr(nchw, name), err_msg=name)


def test_nhwc_runs_on_the_channels_last_kernels_without_copying_the_input(rng):
    layer = ms.BatchNorm2d(4, data_format="NHWC").set_train()
    x = make_input(rng, (2, 3, 5, 4), channel_axis=-1)
    x.flags.writeable = False
    layer(x)
    saved = layer._bn._saved.x
    assert saved.channels_last
    assert np.shares_memory(saved.data, x), "the NHWC input was copied"


def test_nhwc_matches_the_reference(rng):
    layer = randomise(ms.BatchNorm2d(3, data_format="NHWC"), rng).set_train()
    x = make_input(rng, (4, 2, 5, 3), channel_axis=-1)
    y_ref, mean_ref, var_ref = ms_reference(np.moveaxis(x, -1, 1), layer, True)
    assert_close(layer(x), np.moveaxis(y_ref, 1, -1), "output")
    assert_close(layer.moving_mean, mean_ref, "moving_mean")
    assert_close(layer.moving_variance, var_ref, "moving_variance")


def test_against_torch_with_complementary_momentum(torch, rng):
    shape = (4, 3, 5, 6)
    layer = randomise(ms.BatchNorm2d(3, momentum=0.7), rng).set_train()
    ref = torch.nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.gamma))
        ref.bias.copy_(torch.from_numpy(layer.beta))
        ref.running_mean.copy_(torch.from_numpy(layer.moving_mean))
        ref.running_var.copy_(torch.from_numpy(layer.moving_variance))
    for _ in range(3):
        x = make_input(rng, shape)
        dy = rng.standard_normal(shape).astype(np.float32)
        xt = torch.from_numpy(x).requires_grad_()
        yt = ref(xt)
        yt.backward(torch.from_numpy(dy))
        assert_close(layer(x), yt.detach().numpy(), "output", 1e-5)
        assert_close(layer.backward(dy), xt.grad.numpy(), "dx", 1e-5)
        assert_close(layer.grad_gamma, ref.weight.grad.numpy(), "grad_gamma", 1e-5)
        assert_close(layer.grad_beta, ref.bias.grad.numpy(), "grad_beta", 1e-5)
        assert_close(layer.moving_mean, ref.running_mean.numpy(), "moving_mean", 1e-6)
        assert_close(layer.moving_variance, ref.running_var.numpy(), "moving_variance", 1e-6)
        ref.weight.grad = ref.bias.grad = None


# --- construction ----------------------------------------------------------------

@pytest.mark.parametrize("cls", CLASSES.values())
def test_constructor_defaults(cls):
    layer = cls(5)
    assert layer.num_features == 5
    assert layer.eps == 1e-5 and layer.momentum == 0.9 and layer.affine is True
    assert layer.use_batch_statistics is None and layer.data_format == "NCHW"
    assert layer.training is False
    for name, value in zip(MS_NAMES, (0, 1, 1, 0)):
        array = getattr(layer, name)
        assert array.dtype == np.float32 and array.shape == (5,), name
        np.testing.assert_array_equal(array, np.full(5, value), err_msg=name)
    assert layer.grad_gamma is None and layer.grad_beta is None


def test_batchnorm3d_has_no_data_format():
    with pytest.raises(TypeError):
        ms.BatchNorm3d(3, data_format="NHWC")


def test_set_train_switches_and_returns_the_layer():
    layer = ms.BatchNorm2d(3)
    assert layer.set_train() is layer and layer.training is True
    assert layer.set_train(False) is layer and layer.training is False
    assert layer.set_train(mode=True).training is True


@pytest.mark.parametrize("name", ["gamma_init", "beta_init", "moving_mean_init", "moving_var_init"])
@pytest.mark.parametrize("init, expected", [
    ("ones", np.ones(4)), ("zeros", np.zeros(4)), ("ONES", np.ones(4)), ("Zeros", np.zeros(4)),
    (2.5, np.full(4, 2.5)), (-1, np.full(4, -1.0)),
    ([1.0, 2.0, 3.0, 4.0], np.arange(1.0, 5.0)), (np.arange(4), np.arange(4.0)),
])
def test_deterministic_initialisers(name, init, expected):
    layer = ms.BatchNorm1d(4, **{name: init})
    attribute = {"moving_var_init": "moving_variance"}.get(name, name[:-len("_init")])
    np.testing.assert_array_equal(getattr(layer, attribute), expected)
    assert getattr(layer, attribute).dtype == np.float32


def test_random_initialisers_follow_mindspore_and_numpys_seed():
    np.random.seed(1)
    layer = ms.BatchNorm1d(20000, gamma_init="normal", beta_init="uniform")
    assert abs(layer.gamma.std() - 0.01) < 0.0005 and abs(layer.gamma.mean()) < 0.0005
    assert layer.beta.min() >= -0.07 and layer.beta.max() <= 0.07
    assert layer.beta.min() < -0.069 and layer.beta.max() > 0.069
    np.random.seed(1)
    again = ms.BatchNorm1d(20000, gamma_init="normal", beta_init="uniform")
    np.testing.assert_array_equal(again.gamma, layer.gamma)
    np.testing.assert_array_equal(again.beta, layer.beta)


@pytest.mark.parametrize("name", ["gamma_init", "beta_init", "moving_mean_init", "moving_var_init"])
@pytest.mark.parametrize("init, words", [
    ("xavier_uniform", ["'xavier_uniform'", "unknown"]),
    ("one", ["'one'", "unknown"]),
    (np.ones(3), ["(4,)", "(3,)"]),
    (np.ones((4, 1)), ["(4,)", "(4, 1)"]),
    (np.float32(1)[None][None], ["(4,)", "(1, 1)"]),
    (["a", "b", "c", "d"], ["real numbers"]),
    (True, ["(4,)"]),
    (None, ["(4,)"]),
])
def test_bad_initialisers_raise_value_error_naming_them(name, init, words):
    with pytest.raises(ValueError) as info:
        ms.BatchNorm1d(4, **{name: init})
    message = str(info.value)
    assert name in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("eps", [0, -1e-5, 1.0001, 2, float("nan"), "1e-5", None])
def test_eps_outside_zero_one_raises(eps):
    with pytest.raises(ValueError, match="eps must be in \\(0, 1\\]"):
        ms.BatchNorm2d(3, eps=eps)


def test_eps_of_one_is_accepted_and_used(rng):
    layer = ms.BatchNorm1d(3, eps=1).set_train()
    x = make_input(rng, (6, 3))
    assert_close(layer(x), ms_reference(x, ms.BatchNorm1d(3, eps=1), True)[0], "output")


@pytest.mark.parametrize("momentum", [-0.1, 1.5, None, "0.9", True])
def test_momentum_outside_zero_one_raises(momentum):
    with pytest.raises(ValueError, match="momentum"):
        ms.BatchNorm2d(3, momentum=momentum)


@pytest.mark.parametrize("value", ["True", 1, 0, "yes"])
def test_use_batch_statistics_must_be_none_or_bool(value):
    with pytest.raises(ValueError, match="use_batch_statistics"):
        ms.BatchNorm2d(3, use_batch_statistics=value)
    layer = ms.BatchNorm2d(3)
    with pytest.raises(ValueError, match="use_batch_statistics"):
        layer.use_batch_statistics = value
    assert layer.use_batch_statistics is None


@pytest.mark.parametrize("data_format", ["NCDHW", "nchw", "NWC", None])
def test_unknown_data_format_raises(data_format):
    with pytest.raises(ValueError, match="data_format"):
        ms.BatchNorm2d(3, data_format=data_format)


@pytest.mark.parametrize("num_features", [0, -2, 2.0, True])
def test_bad_num_features_raises(num_features):
    with pytest.raises(ValueError, match="num_features"):
        ms.BatchNorm2d(num_features)


def test_momentum_and_eps_can_be_changed_and_are_converted(rng):
    layer = randomise(ms.BatchNorm1d(3), rng).set_train()
    layer.momentum = 0.6
    layer.eps = 0.5
    x = make_input(rng, (5, 3))
    y_ref, mean_ref, var_ref = ms_reference(x, layer, True)
    assert_close(layer(x), y_ref, "output")
    assert_close(layer.moving_mean, mean_ref, "moving_mean")
    assert_close(layer.moving_variance, var_ref, "moving_variance")
    with pytest.raises(ValueError, match="momentum"):
        layer.momentum = 2
    with pytest.raises(ValueError, match="eps"):
        layer.eps = 0
    assert layer.momentum == 0.6 and layer.eps == 0.5


# --- affine=False ------------------------------------------------------------------

def test_affine_false_applies_fixed_gamma_and_beta_without_gradients(rng):
    layer = ms.BatchNorm2d(3, affine=False, gamma_init=2.0, beta_init=0.5).set_train()
    reference = ms.BatchNorm2d(3, gamma_init=2.0, beta_init=0.5).set_train()
    x = make_input(rng, (4, 3, 2, 5))
    y = layer(x)
    assert_close(y, ms_reference(x, ms.BatchNorm2d(3, gamma_init=2.0, beta_init=0.5), True)[0],
                 "output")
    np.testing.assert_array_equal(y, reference(x))
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(layer.backward(dy), reference.backward(dy))
    assert layer.grad_gamma is None and layer.grad_beta is None
    assert reference.grad_gamma is not None
    np.testing.assert_array_equal(layer.gamma, np.full(3, 2.0))
    np.testing.assert_array_equal(layer.beta, np.full(3, 0.5))


# --- inputs --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 4)])
def test_batchnorm1d_accepts_nc_and_ncl(rng, shape):
    layer = randomise(ms.BatchNorm1d(3), rng).set_train()
    x = make_input(rng, shape)
    y_ref = ms_reference(x, layer, True)[0]
    assert_close(layer(x), y_ref, "output")


@pytest.mark.parametrize("cls, shape, data_format, words", [
    (ms.BatchNorm1d, (2, 3, 4, 5), "NCHW", ["2D (N, C) or 3D (N, C, L)", "4D"]),
    (ms.BatchNorm1d, (3,), "NCHW", ["2D (N, C) or 3D (N, C, L)"]),
    (ms.BatchNorm2d, (2, 3, 4), "NCHW", ["4D (N, C, H, W)", "3D"]),
    (ms.BatchNorm3d, (2, 3, 4, 5), "NCHW", ["5D (N, C, D, H, W)", "4D"]),
    (ms.BatchNorm1d, (2, 4, 5, 3), "NHWC", ["(N, L, C)", "NHWC", "4D"]),
    (ms.BatchNorm1d, (3,), "NHWC", ["(N, L, C)", "NHWC", "1D"]),
    (ms.BatchNorm2d, (2, 4, 3), "NHWC", ["4D (N, H, W, C)", "NHWC", "3D"]),
])
@pytest.mark.parametrize("training", [True, False])
def test_wrong_rank_raises_and_keeps_the_state(rng, cls, shape, data_format, words, training):
    kwargs = {} if cls is ms.BatchNorm3d else {"data_format": data_format}
    layer = cls(3, **kwargs).set_train(training)
    before = snapshot(layer)
    with pytest.raises(ValueError) as info:
        layer(np.ones(shape, np.float32))
    for word in words:
        assert word in str(info.value)
    assert_same_state(before, layer)


@pytest.mark.parametrize("data_format, shape, where", [
    ("NCHW", (2, 5, 4, 4), "input.shape[1]"),
    ("NHWC", (2, 4, 4, 5), "input.shape[-1]"),
    ("NHWC", (2, 3, 4, 5), "input.shape[-1]"),
])
def test_wrong_channel_count_names_both_counts(rng, data_format, shape, where):
    layer = used_layer(ms.BatchNorm2d, (2, 3, 4, 3), rng, data_format)
    before = snapshot(layer)
    with pytest.raises(ValueError) as info:
        layer(np.ones(shape, np.float32))
    message = str(info.value)
    assert "expected 3 channels" in message and "got 5" in message and where in message
    assert_same_state(before, layer)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex64, object, bool])
@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_non_floating_input_raises_type_error(rng, dtype, data_format):
    layer = used_layer(ms.BatchNorm2d, (2, 3, 4, 3), rng, data_format)
    before = snapshot(layer)
    with pytest.raises(TypeError, match="floating"):
        layer(np.ones((2, 3, 4, 3), dtype))
    assert_same_state(before, layer)


@pytest.mark.parametrize("use_batch_statistics, training", [(None, True), (True, False)])
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_one_value_per_channel_with_batch_statistics_raises(rng, shape, use_batch_statistics,
                                                            training):
    """MindSpore outputs zeros and makes the moving variance NaN; cbn raises as PyTorch does."""
    cls = CLASSES[max(len(shape) - 2, 1)]
    layer = cls(3, use_batch_statistics=use_batch_statistics).set_train(training)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(make_input(rng, shape))
    assert_same_state(before, layer)


def test_one_value_per_channel_with_moving_statistics_works(rng):
    layer = randomise(ms.BatchNorm1d(3), rng)
    x = make_input(rng, (1, 3))
    assert_close(layer(x), ms_reference(x, layer, False)[0], "output")


@pytest.mark.parametrize("use_batch_statistics", [None, True, False])
@pytest.mark.parametrize("data_format, shape", [("NCHW", (0, 3, 4, 4)), ("NHWC", (0, 4, 4, 3))])
def test_empty_batch_returns_empty_and_keeps_the_moving_statistics(rng, data_format, shape,
                                                                   use_batch_statistics):
    """MindSpore corrupts its moving statistics on an empty batch; cbn leaves them alone."""
    layer = randomise(ms.BatchNorm2d(3, data_format=data_format,
                                     use_batch_statistics=use_batch_statistics), rng).set_train()
    before = layer.parameters_dict()
    y = layer(np.zeros(shape, np.float32))
    assert y.shape == shape and y.dtype == np.float32
    for name, value in before.items():
        np.testing.assert_array_equal(getattr(layer, name), value, err_msg=name)
    assert layer.backward(np.zeros(shape, np.float32)).shape == shape


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_float16_and_float64_inputs_keep_their_dtype(rng, data_format):
    layer = ms.BatchNorm2d(3, data_format=data_format).set_train()
    shape = (2, 3, 4, 3)
    for dtype in (np.float16, np.float64):
        x = make_input(rng, shape, dtype, channel_axis=1 if data_format == "NCHW" else -1)
        y = layer(x)
        assert y.dtype == dtype and y.shape == shape
        assert layer.backward(np.ones(shape, dtype)).dtype == dtype


def test_input_is_not_written_and_non_contiguous_views_work(rng):
    layer = randomise(ms.BatchNorm2d(3), rng).set_train()
    base = make_input(rng, (4, 3, 6, 10))
    x = base[:, :, ::2, 1::3]
    x.flags.writeable = False
    copy = x.copy()
    expected = ms_reference(copy, layer, True)[0]
    assert_close(layer(x), expected, "output")
    np.testing.assert_array_equal(x, copy)


# --- backward ------------------------------------------------------------------------

@pytest.mark.parametrize("cls, shape", SHAPES)
@pytest.mark.parametrize("use_batch", [True, False])
def test_backward_matches_finite_differences_of_the_reference(rng, cls, shape, use_batch):
    layer = randomise(cls(shape[1], dtype=np.float64), rng).set_train(use_batch)
    x = make_input(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    start = {key.rpartition(".")[2]: value  # BatchNorm3d's are bn2d.gamma, ...
             for key, value in layer.parameters_dict().items()}
    layer(x)
    dx = layer.backward(dy)

    def loss(x, gamma, beta):
        frozen = cls(shape[1], dtype=np.float64)
        frozen.load_parameters(dict(start, gamma=gamma, beta=beta))
        return float(np.sum(ms_reference(x, frozen, use_batch)[0] * dy))

    h = 1e-6
    for index in [(0,) * len(shape), tuple(s - 1 for s in shape)]:
        e = np.zeros(shape)
        e[index] = h
        numeric = (loss(x + e, start["gamma"], start["beta"])
                   - loss(x - e, start["gamma"], start["beta"])) / (2 * h)
        assert abs(dx[index] - numeric) < 1e-5 * max(1, abs(numeric)), index
    for c in range(shape[1]):
        e = np.zeros(shape[1])
        e[c] = h
        for name, grad in (("gamma", layer.grad_gamma), ("beta", layer.grad_beta)):
            plus = dict(gamma=start["gamma"], beta=start["beta"])
            minus = dict(plus)
            plus[name] = plus[name] + e
            minus[name] = minus[name] - e
            numeric = (loss(x, **plus) - loss(x, **minus)) / (2 * h)
            assert abs(grad[c] - numeric) < 1e-5 * max(1, abs(numeric)), (name, c)


def test_backward_before_forward_raises_runtime_error():
    with pytest.raises(RuntimeError, match="before any forward"):
        ms.BatchNorm2d(3).backward(np.ones((2, 3, 4, 4)))


@pytest.mark.parametrize("data_format, dy_shape", [
    ("NCHW", (2, 3, 4, 5)), ("NCHW", (2, 3, 5, 4)), ("NHWC", (2, 4, 5, 3)), ("NHWC", (3,)),
])
def test_backward_with_a_wrong_gradient_shape_raises_and_keeps_the_gradients(rng, data_format,
                                                                             dy_shape):
    shape = (2, 3, 5, 4) if data_format == "NHWC" else (2, 3, 4, 4)
    layer = randomise(ms.BatchNorm2d(shape[-1] if data_format == "NHWC" else 3,
                                     data_format=data_format), rng).set_train()
    layer(make_input(rng, shape, channel_axis=-1 if data_format == "NHWC" else 1))
    layer.backward(np.ones(shape))
    before = snapshot(layer)
    with pytest.raises(ValueError) as info:
        layer.backward(np.ones(dy_shape))
    assert str(shape) in str(info.value) and str(dy_shape) in str(info.value)
    assert_same_state(before, layer)


def test_backward_overwrites_the_gradients(rng):
    layer = ms.BatchNorm1d(3).set_train()
    x = make_input(rng, (5, 3))
    layer(x)
    layer.backward(np.ones((5, 3)))
    first = layer.grad_beta.copy()
    layer.backward(np.ones((5, 3)))
    np.testing.assert_array_equal(layer.grad_beta, first)
    np.testing.assert_allclose(first, np.full(3, 5.0))


# --- parameters under MindSpore's names ---------------------------------------------

def test_parameters_dict_has_mindspores_names_and_copies(rng):
    layer = used_layer(ms.BatchNorm2d, (2, 3, 4, 4), rng)
    params = layer.parameters_dict()
    assert list(params) == MS_NAMES
    for name in MS_NAMES:
        np.testing.assert_array_equal(params[name], getattr(layer, name))
        assert not np.shares_memory(params[name], getattr(layer, name))


def test_load_parameters_round_trip(rng):
    source = used_layer(ms.BatchNorm2d, (2, 3, 4, 4), rng)
    target = ms.BatchNorm2d(3)
    assert target.load_parameters(source.parameters_dict()) == ([], [])
    for name in MS_NAMES:
        np.testing.assert_array_equal(getattr(target, name), getattr(source, name))
        assert getattr(target, name).dtype == np.float32
    x = make_input(rng, (2, 3, 4, 4))
    np.testing.assert_array_equal(target(x), source.set_train(False)(x))


@pytest.mark.parametrize("missing", MS_NAMES)
def test_load_parameters_missing_key_raises(rng, missing):
    layer = randomise(ms.BatchNorm1d(3), rng)
    before = snapshot(layer)
    params = {name: np.zeros(3) for name in MS_NAMES if name != missing}
    with pytest.raises(ValueError, match=f"missing keys \\['{missing}'\\]"):
        layer.load_parameters(params)
    assert_same_state(before, layer)


def test_load_parameters_unexpected_key_raises(rng):
    layer = randomise(ms.BatchNorm1d(3), rng)
    before = snapshot(layer)
    params = dict(layer.parameters_dict(), weight=np.zeros(3))
    params["gamma"] = np.zeros(3)
    with pytest.raises(ValueError, match="unexpected keys \\['weight'\\]"):
        layer.load_parameters(params)
    assert_same_state(before, layer)


@pytest.mark.parametrize("key", MS_NAMES)
@pytest.mark.parametrize("strict", [True, False])
def test_load_parameters_wrong_shape_raises_and_loads_nothing(rng, key, strict):
    layer = randomise(ms.BatchNorm1d(3), rng)
    before = snapshot(layer)
    params = {name: np.full(3, 7.0) for name in MS_NAMES}
    params[key] = np.zeros(4)
    with pytest.raises(ValueError, match=f"{key} must have shape \\(3,\\), got shape \\(4,\\)"):
        layer.load_parameters(params, strict=strict)
    assert_same_state(before, layer)


def test_load_parameters_not_strict_reports_and_loads_the_rest(rng):
    layer = randomise(ms.BatchNorm1d(3), rng)
    before = layer.parameters_dict()
    missing, unexpected = layer.load_parameters({"gamma": np.full(3, 4.0), "extra": 1},
                                                strict=False)
    assert missing == ["moving_mean", "moving_variance", "beta"] and unexpected == ["extra"]
    np.testing.assert_array_equal(layer.gamma, np.full(3, 4.0))
    np.testing.assert_array_equal(layer.beta, before["beta"])


def test_parameter_attributes_are_live_and_validated_on_assignment(rng):
    layer = ms.BatchNorm1d(3).set_train()
    layer.gamma = [1.0, 2.0, 3.0]
    layer.moving_mean[...] = 5
    assert layer.gamma.dtype == np.float32
    np.testing.assert_array_equal(layer.parameters_dict()["gamma"], [1, 2, 3])
    np.testing.assert_array_equal(layer.parameters_dict()["moving_mean"], [5, 5, 5])
    with pytest.raises(ValueError, match="beta must have shape \\(3,\\)"):
        layer.beta = np.zeros(2)
    moving = layer.moving_mean
    layer(make_input(rng, (4, 3)))
    assert layer.moving_mean is moving and not np.array_equal(moving, [5, 5, 5])


# --- the layer-level conversion -------------------------------------------------------

@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_from_torch_and_back_behave_identically(rng, dims, training):
    shape = {1: (6, 3), 2: (2, 3, 4, 5), 3: (2, 3, 2, 3, 4)}[dims]
    pt = TORCH_CLASSES[dims](3, momentum=0.1, eps=1e-3)
    pt.weight[...] = rng.uniform(0.5, 2, 3)
    pt.bias[...] = rng.uniform(-1, 1, 3)
    pt(make_input(rng, shape))
    pt.train(training)
    msl = CLASSES[dims].from_torch(pt)
    assert msl.momentum == pytest.approx(0.9) and msl.eps == 1e-3
    assert msl.training is training and msl.use_batch_statistics is None
    back = msl.to_torch()
    assert type(back) is type(pt) and back.momentum == 0.1 and back.training is training
    assert back.num_batches_tracked == 1
    for step in range(3):
        x = make_input(rng, shape)
        dy = rng.standard_normal(shape).astype(np.float32)
        y = pt(x)
        np.testing.assert_array_equal(msl(x), y)
        np.testing.assert_array_equal(back(x), y)
        dx = pt.backward(dy)
        np.testing.assert_array_equal(msl.backward(dy), dx)
        np.testing.assert_array_equal(back.backward(dy), dx)
        np.testing.assert_array_equal(msl.grad_gamma, pt.grad_weight)
        np.testing.assert_array_equal(msl.moving_mean, pt.running_mean)
        np.testing.assert_array_equal(msl.moving_variance, pt.running_var)
        np.testing.assert_array_equal(back.running_var, pt.running_var)


def test_from_torch_copies_instead_of_sharing(rng):
    pt = cbn.BatchNorm2d(3)
    msl = ms.BatchNorm2d.from_torch(pt)
    msl.gamma[...] = 5
    msl.moving_mean[...] = 5
    assert np.all(pt.weight == 1) and np.all(pt.running_mean == 0)
    back = msl.to_torch()
    back.weight[...] = 7
    assert np.all(msl.gamma == 5)


def test_from_torch_without_affine_or_running_statistics(rng):
    pt = cbn.BatchNorm2d(3, affine=False, track_running_stats=False).eval()
    msl = ms.BatchNorm2d.from_torch(pt)
    assert msl.affine is False and msl.use_batch_statistics is True
    x = make_input(rng, (2, 3, 4, 5))
    np.testing.assert_array_equal(msl(x), pt(x))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(msl.backward(dy), pt.backward(dy))
    assert msl.grad_gamma is None
    back = msl.to_torch()
    assert back.affine is False and back.training is True
    np.testing.assert_array_equal(back(x), pt(x))


def test_to_torch_keeps_fixed_non_default_gamma_as_affine(rng):
    msl = ms.BatchNorm1d(3, affine=False, gamma_init=2.0, beta_init="uniform")
    back = msl.to_torch()
    assert back.affine is True and back.training is False
    np.testing.assert_array_equal(back.weight, msl.gamma)
    x = make_input(rng, (4, 3))
    np.testing.assert_array_equal(back(x), msl(x))


@pytest.mark.parametrize("use_batch_statistics, training, torch_training", [
    (None, True, True), (None, False, False), (True, False, True), (False, True, False),
])
def test_to_torch_maps_the_modes_as_they_stand(rng, use_batch_statistics, training, torch_training):
    msl = randomise(ms.BatchNorm2d(3, use_batch_statistics=use_batch_statistics),
                    rng).set_train(training)
    back = msl.to_torch()
    assert back.training is torch_training and back.track_running_stats
    x = make_input(rng, (2, 3, 4, 4))
    np.testing.assert_array_equal(back(x), msl(x))
    np.testing.assert_array_equal(back.running_mean, msl.moving_mean)


def test_from_torch_with_nhwc(rng):
    pt = cbn.BatchNorm2d(3).train()
    msl = ms.BatchNorm2d.from_torch(pt, data_format="NHWC")
    x = make_input(rng, (2, 3, 4, 5))
    np.testing.assert_array_equal(msl(np.moveaxis(x, 1, -1)), np.moveaxis(pt(x), 1, -1))


def test_from_torch_rejects_what_mindspore_cannot_express():
    with pytest.raises(ValueError, match="momentum=None"):
        ms.BatchNorm2d.from_torch(cbn.BatchNorm2d(3, momentum=None))
    with pytest.raises(ValueError, match="eps"):
        ms.BatchNorm2d.from_torch(cbn.BatchNorm2d(3, eps=2.0))
    with pytest.raises(TypeError, match="cbn.BatchNorm2d"):
        ms.BatchNorm2d.from_torch(cbn.BatchNorm1d(3))


def test_repr_names_the_mindspore_settings():
    text = repr(ms.BatchNorm2d(3, momentum=0.8, use_batch_statistics=True, data_format="NHWC"))
    assert text.startswith("BatchNorm2d<num_features=3")
    for word in ("momentum=0.8", "use_batch_statistics=True", "NHWC"):
        assert word in text


def test_import_cbn_exposes_mindspore_and_convert_without_torch_or_mpi():
    import subprocess
    import sys
    code = ("import sys, cbn; cbn.mindspore.BatchNorm2d; cbn.convert.torch_to_mindspore; "
            "assert 'torch' not in sys.modules and 'mpi4py' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- SyncBatchNorm ----------------------------------------------------------------------

def test_sync_batchnorm_defaults_follow_mindspore():
    layer = ms.SyncBatchNorm(4)
    assert layer.momentum == 0.9 and layer.eps == 1e-5 and layer.training is False
    assert layer.use_batch_statistics is None and layer.process_groups is None
    assert "process_groups=None" in repr(layer) and "data_format" not in repr(layer)
    with pytest.raises(TypeError):
        ms.SyncBatchNorm(4, data_format="NHWC")


@pytest.mark.parametrize("process_groups", [None, [[0]]])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 6)])
@pytest.mark.parametrize("use_batch_statistics, training", [(None, True), (True, False),
                                                            (None, False)])
def test_sync_batchnorm_on_one_process_is_the_plain_layer_bit_for_bit(
        rng, shape, process_groups, use_batch_statistics, training):
    sync = ms.SyncBatchNorm(3, momentum=0.75, process_groups=process_groups,
                            use_batch_statistics=use_batch_statistics).set_train(training)
    plain = CLASSES[len(shape) // 2](3, momentum=0.75, use_batch_statistics=use_batch_statistics)
    plain.set_train(training)
    plain.load_parameters(randomise(sync, rng).parameters_dict())
    for _ in range(3):
        x = make_input(rng, shape)
        dy = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(sync(x), plain(x))
        np.testing.assert_array_equal(sync.backward(dy), plain.backward(dy))
        np.testing.assert_array_equal(sync.grad_gamma, plain.grad_gamma)
        for name in MS_NAMES:
            np.testing.assert_array_equal(getattr(sync, name), getattr(plain, name), err_msg=name)


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 4, 5, 6), (3,)])
def test_sync_batchnorm_takes_2d_and_4d_input_as_mindspore(rng, shape):
    layer = ms.SyncBatchNorm(3).set_train()
    with pytest.raises(ValueError, match="2D \\(N, C\\) or 4D \\(N, C, H, W\\)"):
        layer(np.ones(shape, np.float32))


@pytest.mark.parametrize("process_groups", [[[1]], [[0], [0]], "nonsense", [[]]])
def test_sync_batchnorm_rejects_groups_that_do_not_partition_the_world(process_groups):
    pytest.importorskip("mpi4py")
    with pytest.raises(ValueError, match="process_groups"):
        ms.SyncBatchNorm(3, process_groups=process_groups)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_sync_batchnorm_over_ranks_equals_the_plain_layer_on_each_groups_batch(ranks):
    from pathlib import Path

    from launch import run_ranks_script

    here = Path(__file__).parent
    checks = ["world", "process_groups", "inference_does_not_communicate",
              "bad_input_on_one_rank"]
    out = run_ranks_script(ranks, here / "mpi_mindspore_checks.py", *checks)
    for check in checks:
        assert f"OK {check} on {ranks} ranks" in out, out


# --- MindSpore's BatchNorm3d names (bn2d.*) and dtype ---------------------------------------

BN2D_NAMES = ["bn2d." + name for name in MS_NAMES]


def test_batchnorm3d_parameters_dict_has_mindspores_bn2d_names(rng):
    layer = used_layer(ms.BatchNorm3d, (2, 3, 2, 2, 2), rng)
    params = layer.parameters_dict()
    assert list(params) == BN2D_NAMES  # as mindspore.nn.BatchNorm3d's checkpoints
    for name in MS_NAMES:
        np.testing.assert_array_equal(params["bn2d." + name], getattr(layer, name))


@pytest.mark.parametrize("short", [False, True])
def test_batchnorm3d_loads_bn2d_and_short_names(rng, short):
    source = used_layer(ms.BatchNorm3d, (2, 3, 2, 2, 2), rng)
    params = source.parameters_dict()
    if short:
        params = {key[len("bn2d."):]: value for key, value in params.items()}
    target = ms.BatchNorm3d(3)
    assert target.load_parameters(params) == ([], [])
    for name in MS_NAMES:
        np.testing.assert_array_equal(getattr(target, name), getattr(source, name))


def test_batchnorm3d_load_parameters_errors_name_the_real_keys(rng):
    layer = randomise(ms.BatchNorm3d(3), rng)
    before = snapshot(layer)
    params = {key: np.ones(3) for key in BN2D_NAMES}
    with pytest.raises(ValueError, match=r"'bn2d.gamma' and 'gamma' both given"):
        layer.load_parameters(dict(params, gamma=np.ones(3)))
    with pytest.raises(ValueError, match=r"missing keys \['bn2d.beta'\]"):
        layer.load_parameters({k: v for k, v in params.items() if k != "bn2d.beta"})
    with pytest.raises(ValueError, match=r"unexpected keys \['layer.bn2d.gamma'\]"):
        layer.load_parameters(dict(params, **{"layer.bn2d.gamma": np.ones(3)}))
    assert_same_state(before, layer)
    assert layer.load_parameters({"bn2d.gamma": np.full(3, 2.0)}, strict=False) == (
        ["bn2d.moving_mean", "bn2d.moving_variance", "bn2d.beta"], [])
    assert np.all(layer.gamma == 2)


def test_2d_layers_keep_the_short_names():
    assert list(ms.BatchNorm2d(3).parameters_dict()) == MS_NAMES
    assert list(ms.BatchNorm1d(3).parameters_dict()) == MS_NAMES
    with pytest.raises(ValueError, match="unexpected keys"):
        ms.BatchNorm2d(3).load_parameters({"bn2d." + k: np.ones(3) for k in MS_NAMES})


class _MindSporeDtype:
    """Stands in for mindspore.float16 (whose str is 'Float16') without MindSpore."""
    __module__ = "mindspore.common.dtype"

    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


@pytest.mark.parametrize("dtype", [np.float16, "float16", _MindSporeDtype("Float16")])
@pytest.mark.parametrize("cls, shape", SHAPES)
def test_float16_parameters_as_mindspores_dtype(rng, cls, shape, dtype):
    layer = cls(shape[1], dtype=dtype).set_train()
    for name in MS_NAMES:
        assert getattr(layer, name).dtype == np.float16, name
    reference = cls(shape[1]).set_train()  # float32 parameters, same (exact) values
    x = make_input(rng, shape)
    np.testing.assert_array_equal(layer(x), reference(x))
    np.testing.assert_array_equal(layer.moving_mean, reference.moving_mean.astype(np.float16))
    layer.backward(np.ones_like(x))
    assert layer.grad_gamma.dtype == np.float16


def test_mindspore_dtype_float32_object_and_bad_dtypes():
    assert ms.BatchNorm2d(3, dtype=_MindSporeDtype("Float32")).gamma.dtype == np.float32
    for bad in (np.int32, "int8", _MindSporeDtype("Int32"), np.complex64):
        with pytest.raises(TypeError, match="dtype"):
            ms.BatchNorm2d(3, dtype=bad)
