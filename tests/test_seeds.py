"""The PyTorch examples of the seed documents (../shared/seeds/001-003), run with cbn.

Each test is the seed's PyTorch code with ``torch.nn`` replaced by ``cbn`` and its
printed output pasted as the expectation.

Tolerance: the printed numbers are float32 results, and their last digits are
float32 rounding noise of the implementation that printed them, not of the
mathematics: PyTorch 2.13 itself now prints values up to 5e-7 away from them
(e.g. 0.99800587 for the seed's 0.9980063), and the exact float64 results of the
same float32 inputs are up to 1.05e-6 away (-1.3411044522 for the seed's
-1.3411034).  cbn's float32 output adds its own rounding of x * scale + shift,
whose terms reach |13|, i.e. about one float32 ulp (9.5e-7) there.  So outputs
must agree with the print to 2e-6 absolute, i.e. to 5-6 decimals of the 7-8
printed, and every element is checked.
"""

import numpy as np

import cbn

PRINTED_ATOL = 2e-6


def test_seed_001_batchnorm1d():
    net = cbn.BatchNorm1d(4, affine=False, momentum=0.1)
    x = np.array([[0.7, 0.5, 0.5, 0.6], [0.5, 0.4, 0.6, 0.9]]).astype(np.float32)
    output = net(x)
    printed = np.array(
        [[0.9995001, 0.9980063, -0.998006, -0.99977785],
         [-0.9995007, -0.9980057, 0.998006, 0.99977785]]
    )
    assert output.dtype == np.float32 and output.shape == (2, 4)
    np.testing.assert_allclose(output, printed, rtol=0, atol=PRINTED_ATOL)
    # The statistics measured on PyTorch 2.13 and MindSpore 2.10
    # (../shared/reference/anchors.md): 0.9 * 1 + 0.1 * unbiased batch variance.
    np.testing.assert_allclose(net.running_var, [0.902, 0.9005, 0.9005, 0.9045], rtol=1e-6)
    np.testing.assert_allclose(net.running_mean, [0.06, 0.045, 0.055, 0.075], rtol=1e-6)
    assert net.num_batches_tracked == 1


def test_seed_002_batchnorm2d():
    m = cbn.BatchNorm2d(num_features=3, momentum=0.1)
    input_py = np.array([[[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6], [0.7, 0.8]],
                          [[0.9, 1], [1.1, 1.2]]]]).astype(np.float32)
    output = m(input_py)
    printed = np.array(
        [[[[-1.3411044, -0.44703478],
           [0.4470349, 1.3411044]],
          [[-1.3411043, -0.44703442],
           [0.44703496, 1.3411049]],
          [[-1.3411039, -0.44703427],
           [0.44703534, 1.341105]]]]
    )
    assert output.dtype == np.float32 and output.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(output, printed, rtol=0, atol=PRINTED_ATOL)


def test_seed_003_batchnorm3d():
    m = cbn.BatchNorm3d(num_features=2, momentum=0.1)
    input_x = np.array([[[[[0.1, 0.2], [0.3, 0.4]]],
                         [[[0.9, 1], [1.1, 1.2]]]]]).astype(np.float32)
    output = m(input_x)
    printed = np.array(
        [[[[[-1.3411044, -0.44703478],
            [0.4470349, 1.3411044]]],
          [[[-1.3411034, -0.44703388],
            [0.44703573, 1.3411053]]]]]
    )
    assert output.dtype == np.float32 and output.shape == (1, 2, 1, 2, 2)
    np.testing.assert_allclose(output, printed, rtol=0, atol=PRINTED_ATOL)
