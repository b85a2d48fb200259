"""The lease state machine without FUSE: rules, counters, and a property test."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lockfs.lease import Caller, Client, HoldMode, Lease, LeaseBusy

A, B = Client(1, 100), Client(1, 200)


def caller(client: Client, pid: int) -> Caller:
    return Caller(pid, pid, f"cmd{pid}", client)


def take(lease: Lease, who: Caller) -> None:
    """What the guard does for an admitted request."""
    if lease.check(who):
        lease.grant(who)
    lease.note_process(who)


def test_free_lease_is_granted_and_others_are_refused() -> None:
    lease = Lease(HoldMode.PROCESS, clock=lambda: 1000.0)
    take(lease, caller(A, 10))
    assert lease.holder == A
    with pytest.raises(LeaseBusy, match=r"held by mnt:\[100\] \(pids 10; since"):
        lease.check(caller(B, 20))
    assert lease.check(caller(A, 11)) is False


def test_process_mode_keeps_lease_until_last_process_and_handle_are_gone() -> None:
    lease = Lease(HoldMode.PROCESS)
    take(lease, caller(A, 10))
    take(lease, caller(A, 11))
    lease.handle_opened(A, 5)
    assert lease.handle_closed(5) is False  # processes still alive
    assert lease.process_exited(10) is False
    assert lease.process_exited(11) is True
    assert lease.is_free


def test_open_mode_releases_with_last_handle_even_if_process_lives() -> None:
    lease = Lease(HoldMode.OPEN)
    take(lease, caller(A, 10))
    lease.handle_opened(A, 5)
    lease.handle_opened(A, 6)
    assert lease.handle_closed(5) is False
    assert lease.handle_closed(6) is True
    assert lease.is_free


def test_open_mode_request_without_handle_leaves_lease_free() -> None:
    lease = Lease(HoldMode.OPEN)
    take(lease, caller(A, 10))
    assert lease.release_if_unused() is True
    assert lease.is_free


def test_refusals_are_counted_and_the_last_is_kept() -> None:
    lease = Lease(HoldMode.PROCESS, clock=lambda: 5.0)
    lease.refused("pid 1", "open", "held by x")
    last = lease.refused("pid 2", "mkdir", "held by y")
    stats = lease.statistics()
    assert stats.refusals == 2
    assert stats.last_refusal == last
    assert (last.who, last.what, last.at) == ("pid 2", "mkdir", 5.0)


def test_misuse_raises_runtime_error() -> None:
    lease = Lease(HoldMode.PROCESS)
    take(lease, caller(A, 10))
    with pytest.raises(RuntimeError, match="while held by"):
        lease.grant(caller(B, 20))
    with pytest.raises(RuntimeError, match="acted as holder"):
        lease.handle_opened(B, 3)


def test_statistics_describe_the_holder() -> None:
    lease = Lease(HoldMode.PROCESS, clock=lambda: 42.0)
    take(lease, caller(A, 10))
    lease.handle_opened(A, 7)
    stats = lease.statistics()
    assert (stats.state, stats.holder, stats.since, stats.handles) == ("held", str(A), 42.0, 1)
    assert stats.processes == {10: "cmd10"}


class LeaseMachine(RuleBasedStateMachine):
    """Any interleaving of requests, opens, closes and exits from three clients."""

    clients = (A, B, Client(2, 100))

    def __init__(self) -> None:
        super().__init__()
        self.mode = HoldMode.PROCESS
        self.lease = Lease(self.mode)
        self.alive: dict[int, Client] = {}  # pid -> client, processes of the model
        self.handles: dict[int, Client] = {}  # handle -> client
        self.next_handle = 1

    @rule(mode=st.sampled_from(list(HoldMode)))
    @precondition(lambda self: self.lease.is_free and not self.handles and not self.alive)
    def restart(self, mode: HoldMode) -> None:
        self.mode = mode
        self.lease = Lease(mode)

    @rule(client_index=st.integers(0, 2), pid=st.integers(1, 9), opens=st.booleans())
    def request(self, client_index: int, pid: int, opens: bool) -> None:
        client = self.clients[client_index]
        if self.alive.get(pid, client) != client:
            return  # that pid belongs to another client's live process
        who = caller(client, pid)
        holder_before = self.lease.holder
        try:
            take(self.lease, who)
        except LeaseBusy:
            assert holder_before is not None and holder_before != client
            return
        assert holder_before in (None, client)
        self.alive[pid] = client
        if opens:
            self.lease.handle_opened(client, self.next_handle)
            self.handles[self.next_handle] = client
            self.next_handle += 1
        self.lease.release_if_unused()  # the guard's check after every request

    @rule(data=st.data())
    @precondition(lambda self: bool(self.handles))
    def close(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(sorted(self.handles)))
        del self.handles[handle]
        self.lease.handle_closed(handle)

    @rule(data=st.data())
    @precondition(lambda self: bool(self.alive))
    def exit(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.alive)))
        del self.alive[pid]
        self.lease.process_exited(pid)

    @invariant()
    def handles_belong_to_the_holder(self) -> None:
        owners = set(self.handles.values())
        assert owners <= {self.lease.holder}
        assert self.lease.statistics().handles == len(self.handles)

    @invariant()
    def lease_is_never_stranded(self) -> None:
        holder = self.lease.holder
        if holder is None:
            return
        keeps = any(c == holder for c in self.handles.values())
        if self.mode is HoldMode.PROCESS:
            keeps = keeps or any(c == holder for c in self.alive.values())
        assert keeps, "lease held with nothing keeping it"

    @invariant()
    def free_when_nothing_keeps_it(self) -> None:
        if not self.handles and (self.mode is HoldMode.OPEN or not self.alive):
            assert self.lease.is_free


LeaseMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40,
                                          deadline=None)
TestLeaseMachine = LeaseMachine.TestCase
