"""Replicas sharing one model repository folder: a model registered on one is served by the other.

This is how a registered model becomes usable on every replica of a deployment (docker-compose mounts one volume
into all server replicas): each replica checks the folder on lookup and on listing.
"""
import numpy as np
import pytest

from _reference import reference_conv
from _server import ServerProcess
from client import ConvClient, ConvError


@pytest.fixture
def two_replicas(tmp_path):
    shared = tmp_path / "models"
    procs = [ServerProcess(shared).start(), ServerProcess(shared).start()]
    yield procs
    for p in procs:
        p.stop()


def test_model_registered_on_one_replica_is_served_by_the_other(two_replicas):
    a, b = two_replicas
    rng = np.random.default_rng(0)
    k1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    k2 = rng.standard_normal((5, 3, 1, 1)).astype(np.float32)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    with ConvClient(a.target, timeout=30) as ca, ConvClient(b.target, timeout=30) as cb:
        with pytest.raises(ConvError, match="shared-edge") as err:
            cb.infer("shared-edge", x)
        assert err.value.code.name == "NOT_FOUND"

        ca.register_model("shared-edge", [{"kernel": k1, "padding": "same", "activation": "relu"}])
        assert "shared-edge" in [m["name"] if isinstance(m, dict) else getattr(m, "name", m)
                                 for m in cb.list_models()]
        expect = reference_conv(x, k1, padding="same", activation="relu")
        np.testing.assert_allclose(cb.infer("shared-edge", x), expect, rtol=1e-4, atol=1e-4)

        # Replaced on A (delete, then register: a taken name is ALREADY_EXISTS): B serves the new version (a 1x1
        # layer with 5 filters now).
        ca.delete_model("shared-edge")
        ca.register_model("shared-edge", [{"kernel": k2}])
        np.testing.assert_allclose(cb.infer("shared-edge", x), reference_conv(x, k2), rtol=1e-4, atol=1e-4)

        # Deleted on B: A no longer serves it either.
        cb.delete_model("shared-edge")
        with pytest.raises(ConvError, match="shared-edge") as err:
            ca.infer("shared-edge", x)
        assert err.value.code.name == "NOT_FOUND"
