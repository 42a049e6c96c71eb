"""The ResNet-50 shape sweep: every batch-norm shape of ResNet-50 at batch 32.

For each (C, H=W) of ResNet-50's batch-norm layers, NCHW and channels-last,
training forward + backward and eval forward, one row per thread count times
three implementations interleaved in the same run:

* ``torch``: ``torch.nn.BatchNorm2d`` (autograd for forward + backward;
  eval under ``torch.no_grad()``);
* ``cbn.torch``: ``cbn.torch.SyncBatchNorm`` (one process), the same calls;
* ``cbn``: the NumPy layer ``cbn.BatchNorm2d`` (``layer(x)``,
  ``layer.backward(dy)``) on NumPy views of the same memory.

Every implementation's result (``dx`` or ``y``) is checked against the float64
NumPy twin once, before timing.  The byte model is that of ``cases.py``.
"""
import numpy as np

import cases

# (C, H) of ResNet-50's batch-norm layers (H = W), in network order.
RESNET50_SHAPES = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14),
                   (1024, 14), (512, 7), (2048, 7)]
BATCH = 32
MODES = ("train+bwd", "eval")
IMPLEMENTATIONS = ("cbn.torch", "cbn", "torch")


class SweepCase(cases.BatchNormCase):
    """One sweep shape, layout and mode: cbn.torch, the NumPy layer and torch."""

    def __init__(self, channels, size, mode, channels_last):
        layout = "cl" if channels_last else "nchw"
        mode_key = "fwdbwd" if mode == "train+bwd" else "eval"
        super().__init__(f"r50-{mode_key}-{layout}-{channels}x{size}",
                         f"{'fwd+bwd' if mode == 'train+bwd' else 'eval'} "
                         f"{'CL' if channels_last else 'NCHW'} C={channels} H={size}",
                         (BATCH, channels, size, size), mode, channels_last=channels_last)
        self.channels, self.size = channels, size
        self.sweep = True

    def build(self, rng, torch=None):
        prepared = super().build(rng, torch)
        calls = prepared.calls
        x, dy, params = self._inputs
        calls["cbn.torch"] = (self._cbn_torch_call(torch, x, dy, params)
                              if torch is not None else None)
        calls["numpy"] = None  # the textbook NumPy twin: only the reference here
        return prepared

    # Keep the arrays of BatchNormCase.build for the cbn.torch call.
    def _cbn_call(self, x, dy, params):
        self._inputs = (x, dy, params)
        return super()._cbn_call(x, dy, params)

    def _torch_call(self, torch, x, dy, params):
        call = super()._torch_call(torch, x, dy, params)
        if self.mode != "eval":
            return call

        def no_grad_call():
            with torch.no_grad():
                return call()
        return no_grad_call

    def _cbn_torch_call(self, torch, x, dy, params):
        import cbn.torch as cbn_torch
        module = cbn_torch.SyncBatchNorm(self.num_features, eps=cases.EPS)
        with torch.no_grad():
            for tensor, value in zip((module.weight, module.bias, module.running_mean,
                                      module.running_var), params):
                tensor.copy_(torch.from_numpy(value))
        xt = cases._as_tensor(torch, x)
        if self.mode == "eval":
            module.eval()

            def call():
                with torch.no_grad():
                    return module(xt)
            return call
        xt = xt.detach().requires_grad_(True)
        dyt = cases._as_tensor(torch, dy)

        def call():
            xt.grad = None
            module.weight.grad = None
            module.bias.grad = None
            module(xt).backward(dyt)
            return xt.grad
        return call


SWEEP = [SweepCase(c, h, mode, cl) for mode in MODES for cl in (False, True)
         for c, h in RESNET50_SHAPES]


def geometric_mean(values):
    values = [v for v in values if v]
    return float(np.exp(np.mean(np.log(values)))) if values else None
