"""Real-kernel fixtures: a fresh cgroup under a policy, and a loopback listener."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import kernel_prereqs
from kutil import Listener, Policed
from ocihook import loader


@pytest.fixture(autouse=True)
def _kernel():
    kernel_prereqs()


@pytest.fixture(scope="session")
def pins():
    kernel_prereqs()
    return Path(loader.ensure_programs())


@pytest.fixture
def policed(pins):
    made: list[Policed] = []

    def make(policy_text: str, mode: str | None = None) -> Policed:
        p = Policed(policy_text, mode)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def listener():
    made = []

    def make(host: str = "127.0.0.1", proto: str = "tcp") -> Listener:
        lst = Listener(host, proto)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst.close()

