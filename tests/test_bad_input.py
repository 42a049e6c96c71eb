"""Bad input over the public API, driven by hypothesis: a clear error, and no state changed.

Every layer's whole state (parameters, statistics, counters, gradients, modes,
hyper-parameters, what backward keeps) is snapshotted before a call that must
raise, and compared after.  The error is a ``TypeError`` or ``ValueError``
whose message names the argument or attribute at fault.

Covered: ``cbn.BatchNorm1d/2d/3d`` and ``cbn.SyncBatchNorm`` (one process):
construction, ``forward``/``__call__`` (input, ``out``, every attribute as
assigned, ``eps``, ``momentum``, ``num_batches_tracked``), ``backward``,
``load_state_dict``; ``cbn.mindspore.BatchNorm1d/2d/3d``: construction, the
attribute setters, ``load_parameters``, ``construct``; ``cbn.functional.batch_norm``;
``cbn.convert.torch_to_mindspore``, ``mindspore_to_torch``,
``to_torch_state_dict``, ``momentum_*``; ``cbn.fuse.fuse_conv_bn``,
``fuse_linear_bn``, ``inference_scale_shift``; ``cbn.set_num_threads``,
``cbn.threads``.
"""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cbn
import cbn.mindspore as ms
from cbn import convert, fuse
from cbn.functional import batch_norm

C = 3
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

TORCH_CLASSES = {cbn.BatchNorm1d: (4, C), cbn.BatchNorm2d: (2, C, 2, 3),
                 cbn.BatchNorm3d: (2, C, 2, 1, 2), cbn.SyncBatchNorm: (3, C, 2)}
MS_CLASSES = {ms.BatchNorm1d: (4, C), ms.BatchNorm2d: (2, C, 2, 3), ms.BatchNorm3d: (2, C, 2, 1, 2)}


# --- snapshots ---------------------------------------------------------------------------

def _freeze(value):
    if isinstance(value, np.ndarray):
        return ("array", type(value), value.dtype.str, value.shape, value.flags.writeable,
                value.tobytes())
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, (int, float, str, bool, type(None), complex, tuple)):
        return ("value", type(value), value)
    return ("object", id(value))  # e.g. what backward keeps: must stay the same object


def snapshot(layer):
    """Every attribute of ``layer`` (and of the layer a MindSpore facade wraps), frozen."""
    state = {key: _freeze(value) for key, value in vars(layer).items()
             if key not in ("_lock", "_eval_cache", "_spare")}
    inner = vars(layer).get("_bn")
    if inner is not None:
        state["_bn"] = snapshot(inner)
    return state


def assert_raises_and_unchanged(layer, call, names, kinds=(TypeError, ValueError)):
    """``call()`` raises one of ``kinds`` naming one of ``names``; ``layer`` is unchanged."""
    before = snapshot(layer)
    with pytest.raises(kinds) as info:
        call()
    message = str(info.value)
    assert any(name in message for name in names), f"{names} not named in {message!r}"
    assert snapshot(layer) == before, f"state changed by a raising call ({message})"
    return info.value


def used_layer(cls, training=True, track=True, affine=True, bias=True):
    """A layer with non-trivial state: trained a step, a backward done."""
    rng = np.random.default_rng(0)
    layer = cls(C, momentum=0.3, affine=affine, track_running_stats=track, bias=bias)
    shape = TORCH_CLASSES[cls]
    layer(rng.standard_normal(shape).astype(np.float32))
    layer.backward(rng.standard_normal(shape).astype(np.float32))
    return layer.train(training)


def valid_input(cls):
    shape = TORCH_CLASSES.get(cls) or MS_CLASSES[cls]
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


# --- bad values ------------------------------------------------------------------------

BAD_VECTORS = st.sampled_from([
    np.ones(C - 1, np.float32), np.ones(C + 1), np.ones((C, 1)), np.ones((1, C)),
    np.array(["a"] * C), np.ones(C, complex), np.array([None] * C, object),
    np.ones(C, np.int64), [1.0] * C, "abc", 1.0, np.float32(1),
])
BAD_EPS = st.sampled_from(["1e-5", float("nan"), 0.0, -1e-5, float("inf"), 1j, None, [1e-5],
                           True, np.array([1e-5, 1e-5])])
BAD_MOMENTUM = st.sampled_from(["0.1", float("nan"), 1.5, -0.1, float("inf"), 1j, [0.1], True,
                                np.array([0.1, 0.2])])
BAD_COUNT = st.sampled_from(["0", -1, 1.5, None, [0], True, float("nan")])
BAD_INPUTS = st.sampled_from([
    np.ones((4,), np.float32), np.ones((2, C + 1, 2), np.float32), np.ones((2, C, 2), np.int32),
    np.ones((2, C, 2), complex), np.array([[None] * C] * 2, object), "abc", None,
    [[1.0, 2.0, 3.0], [1.0]], np.ones((2, C, 2, 2, 2, 2), np.float32), np.ones((2, C), bool),
])


def bad_vector_attribute_cases():
    return st.tuples(st.sampled_from(["weight", "bias", "running_mean", "running_var"]),
                     BAD_VECTORS)


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)), case=bad_vector_attribute_cases(),
       training=st.booleans())
def test_a_bad_array_attribute_raises_before_any_change(cls, case, training):
    key, value = case
    layer = used_layer(cls, training=training)
    setattr(layer, key, value)
    assert_raises_and_unchanged(layer, lambda: layer(valid_input(cls)), [key])


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)), key=st.sampled_from(["running_mean",
                                                                       "running_var"]))
def test_read_only_running_statistics_raise_in_training(cls, key):
    layer = used_layer(cls)
    getattr(layer, key).setflags(write=False)
    assert_raises_and_unchanged(layer, lambda: layer(valid_input(cls)), [key, "read-only"])
    layer.eval()(valid_input(cls))  # eval only reads them


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)), eps=BAD_EPS, training=st.booleans(),
       track=st.booleans())
def test_a_bad_eps_raises_before_any_change(cls, eps, training, track):
    layer = used_layer(cls, training=training, track=track)
    layer.eps = eps
    assert_raises_and_unchanged(layer, lambda: layer(valid_input(cls)), ["eps"])


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)), momentum=BAD_MOMENTUM)
def test_a_bad_momentum_raises_before_any_change(cls, momentum):
    layer = used_layer(cls)
    layer.momentum = momentum
    assert_raises_and_unchanged(layer, lambda: layer(valid_input(cls)), ["momentum"])


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)), count=BAD_COUNT)
def test_a_bad_num_batches_tracked_raises_before_any_change(cls, count):
    layer = used_layer(cls)
    layer.num_batches_tracked = count
    assert_raises_and_unchanged(layer, lambda: layer(valid_input(cls)), ["num_batches_tracked"])


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)), x=BAD_INPUTS, training=st.booleans(),
       track=st.booleans())
def test_a_bad_input_raises_before_any_change(cls, x, training, track):
    if cls is cbn.SyncBatchNorm and isinstance(x, np.ndarray) and x.ndim == 6:
        return  # any rank >= 2 is SyncBatchNorm's
    layer = used_layer(cls, training=training, track=track)
    assert_raises_and_unchanged(layer, lambda: layer(x),
                                ["input", "channels", "dtype", "shape"])


BAD_OUTS = st.sampled_from(["shape", "dtype", "read_only", "list", "str"])


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)), kind=BAD_OUTS, training=st.booleans())
def test_a_bad_out_raises_before_any_change(cls, kind, training):
    layer = used_layer(cls, training=training)
    x = valid_input(cls)
    out = {"shape": np.empty(x.shape[:-1] + (x.shape[-1] + 1,), np.float32),
           "dtype": np.empty(x.shape, np.float64), "read_only": np.empty_like(x),
           "list": x.tolist(), "str": "out"}[kind]
    if kind == "read_only":
        out.setflags(write=False)
    assert_raises_and_unchanged(layer, lambda: layer(x, out=out), ["out"])
    assert_raises_and_unchanged(layer, lambda: layer.backward(np.ones_like(x), out=out),
                                ["out"])


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)), dy=BAD_INPUTS, training=st.booleans())
def test_a_bad_gradient_raises_before_any_change(cls, dy, training):
    layer = used_layer(cls, training=training)
    assert_raises_and_unchanged(layer, lambda: layer.backward(dy),
                                ["grad_output", "dtype", "shape", "input"])


BAD_STATE_VALUES = st.sampled_from([
    np.array(["a"] * C), np.array([None] * C, object), np.ones(C, complex), np.ones(C - 1),
    np.ones((C, 1)), "abc", None, [[1.0]],
])
BAD_COUNTS = st.sampled_from([np.array(-1), np.array(float("nan")), np.array(1.5),
                              np.array("3"), np.array([1, 2]), np.array(float("inf")),
                              None, np.array(True)])


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)),
       key=st.sampled_from(["weight", "bias", "running_mean", "running_var"]),
       value=BAD_STATE_VALUES, position=st.sampled_from(["first", "last"]))
def test_load_state_dict_checks_every_value_before_assigning_any(cls, key, value, position):
    layer = used_layer(cls)
    good = {name: np.full(C, 7.0) for name in ("weight", "bias", "running_mean", "running_var")}
    good["num_batches_tracked"] = 9
    state = dict(good, **{key: value})
    if position == "first":  # the bad one before the good ones, then after them
        state = {key: value, **{k: v for k, v in state.items() if k != key}}
    assert_raises_and_unchanged(layer, lambda: layer.load_state_dict(state), [key])


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES)), count=BAD_COUNTS)
def test_load_state_dict_checks_the_count(cls, count):
    layer = used_layer(cls)
    state = dict(layer.state_dict(), weight=np.full(C, 7.0), num_batches_tracked=count)
    assert_raises_and_unchanged(layer, lambda: layer.load_state_dict(state),
                                ["num_batches_tracked"])


@pytest.mark.parametrize("state", [[("weight", np.ones(C))], "weight", None, 3])
def test_load_state_dict_needs_a_mapping(state):
    layer = used_layer(cbn.BatchNorm2d)
    assert_raises_and_unchanged(layer, lambda: layer.load_state_dict(state), ["mapping"])


def test_load_state_dict_takes_integer_valued_float_counts():
    layer = cbn.BatchNorm1d(C)
    layer.load_state_dict(dict(layer.state_dict(), num_batches_tracked=np.array(4.0)))
    assert layer.num_batches_tracked == 4 and type(layer.num_batches_tracked) is int


# --- construction ----------------------------------------------------------------------

BAD_NUM_FEATURES = st.sampled_from([0, -1, 2.0, "3", None, True, [3], np.float64(3)])


@SETTINGS
@given(cls=st.sampled_from(list(TORCH_CLASSES) + list(MS_CLASSES)),
       argument=st.sampled_from(["num_features", "eps", "momentum"]), data=st.data())
def test_bad_constructor_arguments_name_themselves(cls, argument, data):
    value = data.draw({"num_features": BAD_NUM_FEATURES, "eps": BAD_EPS,
                       "momentum": BAD_MOMENTUM}[argument])
    kwargs = {"num_features": C, argument: value}
    if cls in MS_CLASSES and argument == "eps" and value is None:
        return
    if argument == "momentum" and value is None:
        return  # PyTorch's cumulative average (MindSpore flavour: raises; checked below)
    with pytest.raises((TypeError, ValueError), match=argument):
        cls(**kwargs)


@pytest.mark.parametrize("cls", list(MS_CLASSES))
def test_mindspore_momentum_none_raises(cls):
    with pytest.raises(ValueError, match="momentum"):
        cls(C, momentum=None)


# --- MindSpore facade ----------------------------------------------------------------------

@SETTINGS
@given(cls=st.sampled_from(list(MS_CLASSES)),
       name=st.sampled_from(["gamma", "beta", "moving_mean", "moving_variance"]),
       value=BAD_VECTORS.filter(lambda v: np.asarray(v).dtype.kind not in "iuf"
                                or np.shape(v) != (C,)))
def test_mindspore_bad_parameter_assignment_changes_nothing(cls, name, value):
    layer = cls(C).set_train()
    layer(valid_input(cls))
    assert_raises_and_unchanged(layer, lambda: setattr(layer, name, value), [name])


@SETTINGS
@given(cls=st.sampled_from(list(MS_CLASSES)),
       attribute=st.sampled_from(["eps", "momentum", "use_batch_statistics"]), data=st.data())
def test_mindspore_bad_hyper_parameter_assignment_changes_nothing(cls, attribute, data):
    value = data.draw({"eps": BAD_EPS.filter(lambda v: v is not None),
                       "momentum": BAD_MOMENTUM,
                       "use_batch_statistics": st.sampled_from(["yes", 1, 0.0, [True]])}[attribute])
    layer = cls(C).set_train()
    layer(valid_input(cls))
    assert_raises_and_unchanged(layer, lambda: setattr(layer, attribute, value), [attribute])


@SETTINGS
@given(cls=st.sampled_from(list(MS_CLASSES)),
       name=st.sampled_from(["gamma", "beta", "moving_mean", "moving_variance"]),
       value=BAD_STATE_VALUES, short=st.booleans())
def test_mindspore_load_parameters_checks_every_value_first(cls, name, value, short):
    layer = cls(C).set_train()
    layer(valid_input(cls))
    params = {key.rpartition(".")[2] if short else key: np.full(C, 5.0)
              for key in layer.parameters_dict()}
    bad_key = next(key for key in params if key.endswith(name))
    params[bad_key] = value
    assert_raises_and_unchanged(layer, lambda: layer.load_parameters(params), [bad_key])


@SETTINGS
@given(cls=st.sampled_from(list(MS_CLASSES)), x=BAD_INPUTS, training=st.booleans())
def test_mindspore_bad_input_changes_nothing(cls, x, training):
    layer = cls(C).set_train(training)
    layer(valid_input(cls))
    assert_raises_and_unchanged(layer, lambda: layer(x), ["input", "channels", "dtype", "shape"])


# --- functional ----------------------------------------------------------------------------

@SETTINGS
@given(argument=st.sampled_from(["eps", "momentum", "weight", "bias", "running_mean",
                                 "running_var", "input"]), training=st.booleans(), data=st.data())
def test_functional_bad_arguments_change_no_statistics(argument, training, data):
    strategy = {"eps": BAD_EPS, "momentum": BAD_MOMENTUM.filter(lambda v: v is not None),
                "weight": BAD_VECTORS.filter(lambda v: np.asarray(v).dtype.kind not in "iuf"
                                             or np.shape(v) != (C,)),
                "bias": BAD_VECTORS.filter(lambda v: np.asarray(v).dtype.kind not in "iuf"
                                           or np.shape(v) != (C,)),
                "running_mean": BAD_VECTORS, "running_var": BAD_VECTORS,
                "input": BAD_INPUTS.filter(lambda v: v is not None and not (
                    isinstance(v, np.ndarray) and v.ndim == 6))}[argument]
    value = data.draw(strategy)
    if argument == "momentum" and not training:
        return  # not used in eval, as in torch
    if argument.startswith("running") and not training and isinstance(value, (list,)) or (
            argument.startswith("running") and not training
            and np.asarray(value).dtype.kind in "iu" and np.shape(value) == (C,)):
        return  # read only in eval: a real (C,) array-like is fine there
    mean, var = np.full(C, 0.5), np.full(C, 2.0)
    kwargs = dict(input=valid_input(cbn.BatchNorm1d), running_mean=mean, running_var=var,
                  training=training)
    kwargs[argument] = value
    with pytest.raises((TypeError, ValueError)) as info:
        batch_norm(**kwargs)
    message = str(info.value)
    names = [argument] + (["channels", "dtype", "shape", "rank"] if argument == "input" else [])
    assert any(name in message for name in names), message
    np.testing.assert_array_equal(mean, 0.5)
    np.testing.assert_array_equal(var, 2.0)


def test_functional_rejects_complex_momentum_and_nan_eps():
    x = valid_input(cbn.BatchNorm1d)
    mean, var = np.zeros(C), np.ones(C)
    with pytest.raises(TypeError, match="momentum"):
        batch_norm(x, mean, var, training=True, momentum=1j)
    with pytest.raises(ValueError, match="eps"):
        batch_norm(x, mean, var, eps=float("nan"))
    assert np.all(mean == 0) and np.all(var == 1)


# --- convert -----------------------------------------------------------------------------

BAD_STATES = st.sampled_from([None, [("weight", 1)], "weight", 3, {1: np.zeros(C)},
                              {("a", "b"): np.zeros(C)}, {None: 1}])


@SETTINGS
@given(function=st.sampled_from([convert.torch_to_mindspore, convert.mindspore_to_torch]),
       state=BAD_STATES)
def test_convert_bad_states_name_the_problem(function, state):
    with pytest.raises(TypeError, match="mapping|keys must be str"):
        function(state)


@pytest.mark.parametrize("value", [np.array(["a"] * C), np.ones(C, complex),
                                   np.array([None] * C, object)])
def test_convert_bad_values_name_the_key(value):
    with pytest.raises(TypeError, match="'bn.running_var'"):
        convert.torch_to_mindspore({"bn.running_mean": np.zeros(C), "bn.running_var": value})
    with pytest.raises(TypeError, match="'bn.moving_variance'"):
        convert.mindspore_to_torch({"bn.moving_mean": np.zeros(C), "bn.moving_variance": value})


@pytest.mark.parametrize("batchnorm3d", ["layer", 3, [3], object()])
def test_convert_bad_batchnorm3d_raises(batchnorm3d):
    with pytest.raises(TypeError, match="batchnorm3d"):
        convert.torch_to_mindspore({"weight": np.ones(C)}, batchnorm3d=batchnorm3d)
    with pytest.raises(TypeError, match="batchnorm3d"):
        convert.mindspore_to_torch({"gamma": np.ones(C)}, batchnorm3d="yes")


@SETTINGS
@given(function=st.sampled_from([convert.momentum_torch_to_mindspore,
                                 convert.momentum_mindspore_to_torch]),
       momentum=BAD_MOMENTUM.filter(lambda v: v is not None))
def test_convert_bad_momentum(function, momentum):
    with pytest.raises((TypeError, ValueError), match="momentum"):
        function(momentum)


# --- fuse ------------------------------------------------------------------------------------

def eval_layers():
    return [used_layer(cbn.BatchNorm2d, training=False),
            ms.BatchNorm2d(C).set_train(False)]


@SETTINGS
@given(bias=st.sampled_from(["abc", np.array(["a"] * C), np.array([None] * C, object),
                             np.ones(C, complex), np.ones(C + 1), [[1.0] * C]]),
       which=st.sampled_from([0, 1]), linear=st.booleans())
def test_fuse_bad_bias_names_bias(bias, which, linear):
    bn = eval_layers()[which]
    weight = np.ones((C, 2)) if linear else np.ones((C, 2, 1, 1))
    function = fuse.fuse_linear_bn if linear else fuse.fuse_conv_bn
    before = snapshot(bn)
    with pytest.raises((TypeError, ValueError), match="bias"):
        function(weight, bias, bn)
    assert snapshot(bn) == before


@SETTINGS
@given(weight=st.sampled_from(["abc", np.ones((C, 2), int), np.ones((C, 2), complex),
                               np.array([[None] * 2] * C, object), [[1.0], [1.0, 2.0]]]),
       linear=st.booleans())
def test_fuse_bad_weight_names_weight(weight, linear):
    bn = eval_layers()[0]
    function = fuse.fuse_linear_bn if linear else fuse.fuse_conv_bn
    with pytest.raises((TypeError, ValueError), match="weight"):
        function(weight, None, bn)


@pytest.mark.parametrize("kwargs, name", [({"transposed": "yes"}, "transposed"),
                                          ({"groups": 0}, "groups"),
                                          ({"groups": "2"}, "groups")])
def test_fuse_bad_options_name_themselves(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        fuse.fuse_conv_bn(np.ones((C, 2, 1, 1)), None, eval_layers()[0], **kwargs)


@SETTINGS
@given(key=st.sampled_from(["weight", "bias", "running_mean", "running_var", "eps"]),
       data=st.data())
def test_fuse_names_a_bad_layer_attribute(key, data):
    bn = eval_layers()[0]
    setattr(bn, key, data.draw(BAD_EPS.filter(lambda v: v is not None) if key == "eps"
                               else BAD_VECTORS.filter(lambda v: not isinstance(v, float))
                               .filter(lambda v: np.asarray(v).dtype.kind not in "iuf"
                                       or np.shape(v) != (C,))))
    for function in (fuse.inference_scale_shift,
                     lambda bn: fuse.fuse_conv_bn(np.ones((C, 2, 1, 1)), None, bn)):
        with pytest.raises((TypeError, ValueError), match=key):
            function(bn)


def test_fuse_rejects_non_layers():
    for bn in (None, "bn", np.ones(C)):
        with pytest.raises(TypeError, match="cbn batch-norm layer"):
            fuse.inference_scale_shift(bn)


# --- threads -------------------------------------------------------------------------------

@SETTINGS
@given(n=st.one_of(st.integers(max_value=0), st.integers(min_value=cbn.MAX_THREADS + 1),
                   st.sampled_from(["2", 2.0, None, True, [2], 1j])))
def test_bad_thread_counts(n):
    before = cbn.get_num_threads()
    with pytest.raises(ValueError, match="number of threads"):
        cbn.set_num_threads(n)
    with pytest.raises(ValueError, match="number of threads"):
        with cbn.threads(n):
            pass
    assert cbn.get_num_threads() == before
