"""Backend names: what the registry builds, what a spec may ask for, what the launcher receives."""
from __future__ import annotations

import re
import typing

import pytest

from tandem.cluster.deployment import launch_config
from tandem.cluster.spec import parse_spec
from tandem.cluster.spec_types import Backend, SpecError
from tandem.transfer.registry import make_transport

CPU_BACKENDS = [("ray", "RayObjectTransport"), ("shm", "ShmTransport"), ("auto", "AutoTransport"),
                ("local", "LocalTransport")]


def _spec(backend: str, device: str = "cpu"):
    return parse_spec({"name": "t", "model": {"name": "no-such-model"},
                       "transfer": {"backend": backend},
                       "prefill": {"device": device}, "decode": {"device": device}})


@pytest.mark.parametrize("name,cls", CPU_BACKENDS)
def test_registry_builds_each_cpu_backend(name, cls):
    transport = make_transport(name)
    assert type(transport).__name__ == cls and transport.name == name


def _registry_knows(name: str) -> bool:
    """Whether ``make_transport`` builds ``name``, or knows it and says what this host lacks
    (nccl without CUDA: a RuntimeError naming what it needs), rather than calling it unknown."""
    try:
        transport = make_transport(name)
    except ValueError as exc:
        assert "unknown transfer backend" in str(exc)
        return False
    except RuntimeError as exc:
        assert str(exc).startswith(f"{name} needs "), exc
        return True
    assert transport.name == name
    getattr(transport, "close", lambda: None)()
    return True


def test_unknown_backend_lists_exactly_the_backends_that_build():
    """The error's list is what a user picks from: every name in it must build, and every
    backend that builds (those tested above, nccl, anything a spec accepts) must be in it."""
    with pytest.raises(ValueError, match=r"unknown transfer backend 'tcp' \(expected one of: ") as info:
        make_transport("tcp")
    listed = re.search(r"expected one of: (.*)\)$", str(info.value))[1].split(", ")
    assert len(listed) == len(set(listed))
    candidates = {*listed, *(n for n, _ in CPU_BACKENDS), "nccl", *typing.get_args(Backend)}
    assert set(listed) == {n for n in candidates if _registry_knows(n)}


def test_every_spec_backend_is_one_the_registry_builds():
    """A spec that validates must not name a backend the launcher then cannot construct."""
    assert all(_registry_knows(name) for name in typing.get_args(Backend))


@pytest.mark.parametrize("backend", ["auto", "shm", "ray"])
def test_the_launcher_gets_the_spec_backend(backend):
    assert launch_config(_spec(backend), "/m").transfer_backend == backend


def test_shm_needs_cpu_instances():
    with pytest.raises(SpecError, match=r"transfer.backend: shm needs device cpu \(prefill.device is cuda\)"):
        _spec("shm", "cuda")
