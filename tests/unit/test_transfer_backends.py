"""Backend names: what the registry builds, what a spec may ask for, what the launcher receives."""
from __future__ import annotations

import pytest

from tandem.cluster.deployment import launch_config
from tandem.cluster.spec import parse_spec
from tandem.cluster.spec_types import SpecError
from tandem.transfer.registry import BACKENDS, make_transport


def _spec(backend: str, device: str = "cpu"):
    return parse_spec({"name": "t", "model": {"name": "no-such-model"},
                       "transfer": {"backend": backend},
                       "prefill": {"device": device}, "decode": {"device": device}})


@pytest.mark.parametrize("name,cls", [("ray", "RayObjectTransport"), ("shm", "ShmTransport"),
                                      ("auto", "AutoTransport"), ("local", "LocalTransport")])
def test_registry_builds_each_cpu_backend(name, cls):
    transport = make_transport(name)
    assert type(transport).__name__ == cls and transport.name == name


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown transfer backend 'tcp'.*auto, shm, ray, local, nccl"):
        make_transport("tcp")
    assert set(BACKENDS) == {"auto", "shm", "ray", "local", "nccl"}


@pytest.mark.parametrize("backend", ["auto", "shm", "ray"])
def test_the_launcher_gets_the_spec_backend(backend):
    assert launch_config(_spec(backend), "/m").transfer_backend == backend


def test_shm_needs_cpu_instances():
    with pytest.raises(SpecError, match=r"transfer.backend: shm needs device cpu \(prefill.device is cuda\)"):
        _spec("shm", "cuda")
