"""Random walks of three real clients against a model of the lease rules.

Why: test_unit_lease.py checks the rules on the pure state machine; this
checks the whole daemon (identities, pidfd watchers, FUSE release, the OFD
lock, status) against the same rules, with real namespaces and real exits,
in orders nobody wrote down. Each step's result must be what the model says,
and between steps ``lockfs status`` must settle on the model's holder
(releases arrive asynchronously: FUSE sends RELEASE after close() returns,
and a pidfd becomes readable after the exit).
"""

from __future__ import annotations

import errno
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from conftest import Agent, Mount, wait_for

SLOTS = 3
STEPS = 40
CASES = [("process", seed) for seed in range(3)] + [("open", seed) for seed in range(3)]


@dataclass
class Slot:
    """One client (mount namespace) and the handles the model says it has open."""

    agent: Agent
    handles: list[int] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return f"mnt:[{os.stat(f'/proc/{self.agent.pid}/ns/mnt').st_ino}]"


class Walk:
    """Drives the clients and keeps the model: who holds the lease."""

    def __init__(self, mount: Mount, agents: Callable[..., Agent], hold: str,
                 rng: random.Random) -> None:
        self.mount, self.agents, self.hold, self.rng = mount, agents, hold, rng
        self.slots = [Slot(agents()) for _ in range(SLOTS)]
        self.holder: int | None = None
        self.made = 0
        self.refused = 0  # steps the model expected to be refused

    def may_use(self, index: int) -> bool:
        return self.holder in (None, index)

    def settle(self, trace: list[str]) -> None:
        """Wait until status shows the model's holder (or free)."""
        def agrees() -> bool:
            status = self.mount.status()
            if self.holder is None:
                return status["state"] == "free"
            return (status["state"] == "held here"
                    and status["holder"] == self.slots[self.holder].namespace)
        wait_for(agrees, timeout=15, what=f"status to agree with the model after {trace[-5:]}")

    def step(self, trace: list[str]) -> None:
        index = self.rng.randrange(SLOTS)
        slot = self.slots[index]
        action = self.rng.choice(("open", "open", "close", "exit", "kill", "mkdir", "stat"))
        trace.append(f"{action} by {index} (holder {self.holder})")
        path = str(self.mount.dst / self.rng.choice(("f0", "f1")))
        if action == "open":
            expected = 0 if self.may_use(index) else errno.EBUSY
            self.refused += expected != 0
            try:
                fd = slot.agent.call("open", path, self.rng.choice(("r", "rw")))
            except OSError as exc:
                assert exc.errno == expected != 0, trace
            else:
                assert expected == 0, trace
                slot.handles.append(fd)
                self.holder = index
        elif action == "close" and slot.handles:
            slot.agent.call("close", slot.handles.pop())
            if self.hold == "open" and self.holder == index and not slot.handles:
                self.holder = None
        elif action in ("exit", "kill"):
            if action == "exit":
                slot.agent.exit()
            else:
                slot.agent.kill(signal.SIGKILL)
            self.slots[index] = Slot(self.agents())
            if self.holder == index:
                self.holder = None
        elif action == "mkdir":
            self.made += 1
            result = slot.agent.errno_of("mkdir", str(self.mount.dst / f"dir{self.made}"))
            self.refused += not self.may_use(index)
            assert result == (0 if self.may_use(index) else errno.EBUSY), trace
            if result == 0 and self.hold == "process":
                self.holder = index  # its process used the directory: it holds it
        elif action == "stat":
            assert slot.agent.errno_of("stat", str(self.mount.dst)) == 0, trace
        self.settle(trace)


@pytest.mark.parametrize(("hold", "seed"), CASES, ids=[f"{h}-{s}" for h, s in CASES])
def test_random_clients_follow_the_lease_rules(
        hold: str, seed: int, mount_factory: Callable[..., Mount],
        agents: Callable[..., Agent]) -> None:
    """Opens, closes, exits, kills, mkdirs and stats of three clients in random
    order: every refusal and every admission is the one the rules give."""
    mount = mount_factory(None, f"--hold={hold}")
    for name in ("f0", "f1"):
        (mount.src / name).write_text(name)
    walk = Walk(mount, agents, hold, random.Random(seed))
    trace: list[str] = []
    for _ in range(STEPS):
        walk.step(trace)
    assert walk.refused > 0, "a walk without a single conflict tests little"
