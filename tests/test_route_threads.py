"""The CPU units the server reserves for a request are the threads convcore's plans will really use.

convcore weighs depthwise and packed NHWC work more than its FLOPs when it picks a thread count (they gain from the
team sooner); a server that resolved threads from the raw FLOPs reserved one CPU for a layer running on two.
"""
import numpy as np
import pytest

import convcore
from server._model import Layer, Model


def _model(kernel_shape, groups, data_format):
    kernel = np.random.default_rng(0).standard_normal(kernel_shape).astype(np.float32)  # O, I/g, spatial
    if data_format == "channels_last":  # Keras's HWIO, the default kernel layout of channels_last
        kernel = np.ascontiguousarray(np.transpose(kernel, (2, 3, 1, 0)))
    options = dict(strides=1, padding="same", dilation=1, groups=groups, data_format=data_format,
                   kernel_layout=None, activation=None)
    return Model.build("m", [Layer(kernel, None, options)])


@pytest.mark.parametrize("kernel_shape, groups, data_format, x_shape", [
    ((144, 1, 3, 3), 144, "channels_last", (1, 56, 56, 144)),   # depthwise NHWC, 8 MFLOP (weighted 8x)
    ((144, 1, 3, 3), 144, "channels_first", (1, 144, 56, 56)),  # depthwise NCHW
    ((24, 144, 1, 1), 1, "channels_last", (1, 56, 56, 144)),    # packed NHWC 1x1, 22 MFLOP (weighted 2.5x)
    ((16, 16, 3, 3), 1, "channels_first", (1, 16, 32, 32)),     # tiny dense: one thread
])
@pytest.mark.parametrize("num_threads", [None, 2])
def test_route_reserves_the_threads_the_plans_use(kernel_shape, groups, data_format, x_shape, num_threads):
    model = _model(kernel_shape, groups, data_format)
    route = model.route(x_shape, num_threads)
    expected = max(plan.num_threads(x_shape[0]) for plan in route.plans)
    assert route.threads == expected
    # And that is not the raw-FLOPs answer for the weighted kinds on a machine with two or more usable CPUs.
    raw = convcore.resolve_num_threads(num_threads, flops=route.plans[0].geometry.flops(x_shape[0]))
    if convcore.usable_cpus() >= 2 and (groups > 1 and data_format == "channels_last" or kernel_shape[2] == 1):
        assert expected > raw
