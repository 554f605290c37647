"""Work sized by measuring this machine, for the tests whose point is that work outlasts something (a deadline, a
cancellation, a drain, a queued call).

A constant ("40 layers is 0.5-1 s") is only true on the machine it was written on: on a 3x faster CPU the work ends
before the deadline it was meant to outlast and the test fails, or worse, passes without testing anything. So the
slow model here is a stack of identical cheap layers whose *depth* is chosen from the measured time of one layer::

    from _calibrate import slow_model
    slow = slow_model()               # measured once per test process
    ServerProcess(repo, *slow.server_args()).start()
    c.register_model("slow", slow.layers())
    c.infer("slow", slow.input)       # ~slow.seconds of work on one thread (longer on a busy machine)

Tests then derive their waits and deadlines from ``slow.seconds`` (or from the time the server really took, see
`time_call`) instead of constants, keep their upper bounds generous (a loaded 2-core machine is 10x slower at times),
and state what they need with `require_longer`, so too little work is an error, never a test that silently passes.

``CONVTEST_WORK_SCALE`` (default 1) multiplies the calibrated work: run the suite with 0.1 and 10 to see it pass
as a 10x faster or 10x slower machine than calibration thinks would see it.
"""
import functools
import math
import os
import time

import numpy as np

__all__ = ["WORK_SCALE", "SLOW_INPUT", "QUICK_X", "QUICK_K", "QUICK_Y", "SlowModel", "slow_model", "time_call",
           "require_longer", "queued_behind"]


def _work_scale():
    text = os.environ.get("CONVTEST_WORK_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"CONVTEST_WORK_SCALE must be a positive number (a factor on the calibrated work), got "
                         f"{text!r}")
    return scale


#: Factor on every calibrated amount of work (CONVTEST_WORK_SCALE).
WORK_SCALE = _work_scale()

#: The slow model's layer: 8 -> 8 channels, 3x3 "same", on a 1x8x512x256 input (4 MiB, under the 6-8 MiB limits of
#: tests/test_limits.py): much work per byte of weights (2.3 KB a layer), so even a deep stack registers quickly, and
#: about 10 ms a layer (measured on an AMD EPYC vCPU), so cancellation between layers stays prompt.
_CHANNELS, _HEIGHT, _WIDTH = 8, 512, 256
#: The slow model's input (the model is the identity, so this is also its output).
SLOW_INPUT = np.ones((1, _CHANNELS, _HEIGHT, _WIDTH), np.float32)

#: A quick one-off Conv that still needs a compute slot, for tests that check whether the slot is free or queued:
#: 3x3 16->16 of ones on 64x64 ("valid", ~18 MFLOP, ~0.3 ms on one core), over the server's light-job work
#: (`server._service.LIGHT_JOB_FLOPS`), below which a job never waits for a CPU unit and so would not notice a
#: busy slot. Every output value is 144 (= 16 x 9), exactly.
QUICK_X = np.ones((1, 16, 64, 64), np.float32)
QUICK_K = np.ones((16, 16, 3, 3), np.float32)
QUICK_Y = np.full((1, 16, 62, 62), 144.0, np.float32)


def _identity_kernel(channels):
    """A 3x3 kernel that copies each channel (1 at the centre of its own tap): the output equals the input exactly,
    at every depth, so values neither blow up nor decay into denormals (which would make the time unpredictable)
    and a test can check the answer."""
    k = np.zeros((channels, channels, 3, 3), np.float32)
    k[np.arange(channels), np.arange(channels), 1, 1] = 1.0
    return k


class SlowModel:
    """A registered model of `depth` identical layers, and the input it is slow on.

    Attributes
    ----------
    depth : int
        Layers (calibrated: `seconds` / `layer_seconds`, times CONVTEST_WORK_SCALE).
    layer_seconds : float
        One layer on one thread, measured here (the fastest of several runs: a busy machine only makes real calls
        longer than planned, never shorter).
    input : numpy.ndarray
        The (1, 8, 512, 256) float32 input; the model's output equals it.
    """

    def __init__(self, depth, layer_seconds):
        self.depth = depth
        self.layer_seconds = layer_seconds
        self.input = SLOW_INPUT
        self.kernel = _identity_kernel(_CHANNELS)

    @property
    def seconds(self):
        """Expected time of one Infer on one thread of a quiet machine (a busy one takes longer)."""
        return self.depth * self.layer_seconds

    def layers(self):
        """The layers for `register_model`."""
        return [{"kernel": self.kernel, "padding": "same"} for _ in range(self.depth)]

    def layer_messages(self):
        """The layers as protobuf `Layer` messages (for tests that talk to the stubs directly)."""
        from convproto.convservice.v1 import conv_pb2

        kernel = conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=self.kernel.shape, data=self.kernel.tobytes())
        return [conv_pb2.Layer(kernel=kernel, spec=conv_pb2.LayerSpec(padding=conv_pb2.Padding(mode="same")))
                for _ in range(self.depth)]

    def server_args(self):
        """Flags a server needs to run this model as calibrated: one OpenMP thread, and room for its layers."""
        return ["--omp-threads", "1", "--max-layers", str(max(64, self.depth))]

    def __repr__(self):
        return (f"SlowModel(depth={self.depth}, layer={self.layer_seconds * 1e3:.1f} ms, ~{self.seconds:.2f} s, "
                f"CONVTEST_WORK_SCALE={WORK_SCALE:g})")


def _layer_seconds(repeats=5):
    import convcore

    x = SLOW_INPUT
    plan = convcore.make_plan(x.shape, _identity_kernel(_CHANNELS), padding="same", num_threads=1)
    out = np.empty(plan.output_shape(1), np.float32)
    plan.run(x, out=out)  # warm-up: page faults, first-touch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan.run(x, out=out)
        times.append(time.perf_counter() - start)
    return min(times)


@functools.lru_cache(maxsize=None)
def slow_model(seconds=3.0):
    """The slow model for about `seconds` of one-thread work here (times CONVTEST_WORK_SCALE), measured once.

    3 s by default: every test using it still has a margin when the work is 10x shorter than planned (0.3 s)."""
    layer = _layer_seconds()
    depth = max(2, math.ceil(seconds * WORK_SCALE / layer))
    return SlowModel(depth, layer)


def time_call(fn, *args, **kwargs):
    """``(result, seconds)`` of one call: what the work really took on the server, busy machine included."""
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def require_longer(what, seconds, than):
    """Fail (not skip, not pass) when the work a test relies on is too short to mean anything."""
    assert seconds > than, (f"{what} took {seconds:.3f} s, not more than the {than:.3f} s the test needs: the "
                            f"calibration is off (CONVTEST_WORK_SCALE={WORK_SCALE:g}); see tests/_calibrate.py")


def queued_behind(proc, running, slow):
    """True once a QUICK call, sent with a short deadline while the thread `running` makes a call of `slow` on the
    server `proc`, was queued behind it and dropped at its deadline (the server logs the drop, never computing it):
    the slow call then holds the compute slot. False if the slow call ended first.

    The slow call may have arrived without holding the slot yet (a busy machine can stall its RPC thread): a quick
    call that still finds the slot free simply succeeds, and the next one is tried."""
    import grpc

    from client import ConvClient, ConvError

    dropped = "dropped a queued compute job"
    with ConvClient(proc.target, timeout=max(0.1, min(0.2, slow.seconds / 5))) as hurried:
        while running.is_alive():
            drops = proc.log().count(dropped)
            try:
                hurried.conv(QUICK_X, QUICK_K)
            except ConvError as exc:
                assert exc.code == grpc.StatusCode.DEADLINE_EXCEEDED, exc
                for _ in range(500):  # the log line follows the status within moments; 5 s at most
                    if proc.log().count(dropped) > drops:
                        return True
                    time.sleep(0.01)
    return False
