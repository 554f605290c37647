"""convcore: batched Conv1D/2D/3D over NCHW/NHWC tensors, im2col + GEMM in Cython with OpenMP.

Public API
----------
conv, conv1d, conv2d, conv3d
    Compute a convolution layer (Keras/PyTorch/ONNX semantics), optionally with bias and a fused activation.
output_shape
    Shape inference without computing.
make_plan, ConvPlan
    Build once per layer shape, run many times (what a server caches per registered model).
openmp_enabled, resolve_num_threads, usable_cpus
    Whether the extension was built with OpenMP; the one place that picks a thread count; the CPUs this process may
    use (affinity capped by the cgroup CPU quota), which the server sizes itself from.
get_max_output_bytes, set_max_output_bytes
    The guard that refuses absurd outputs before allocating them.
kernel_isa
    Which micro-kernel level new plans run ("portable", "avx2", "avx512"): the CPU's best, or a lower one forced
    with the ``CONVCORE_ISA`` environment variable.
"""
from ._api import (
    ACTIVATIONS,
    ConvPlan,
    conv,
    conv1d,
    conv2d,
    conv3d,
    get_max_output_bytes,
    make_plan,
    output_shape,
    set_max_output_bytes,
)
from ._isa import kernel_isa
from ._threads import openmp_enabled, resolve_num_threads, usable_cpus

__all__ = [
    "ACTIVATIONS",
    "ConvPlan",
    "conv",
    "conv1d",
    "conv2d",
    "conv3d",
    "get_max_output_bytes",
    "kernel_isa",
    "make_plan",
    "openmp_enabled",
    "output_shape",
    "resolve_num_threads",
    "set_max_output_bytes",
    "usable_cpus",
]
__version__ = "0.1.0"
