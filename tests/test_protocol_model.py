"""The ownership protocol against a plain-Python model of it (hypothesis stateful testing).

Three simulated workers (three managers with their own worker ids, on one Redis) run
random sequences of start, append (automatic and explicit seq, duplicates included),
heartbeat, lease expiry, claim, release and complete on a few request ids. After every
step the model and Redis must agree on each request's owner, epoch, prefix, token count,
last seq, state and lease, on what each worker holds, and on which calls raised
LeaseLostError (with which details). A lease expires by setting its ``lease`` field to 0
directly, so no test waits for a clock.

Runs on fakeredis and on a real redis-server (fewer examples there).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from flo_coord import AppendAck, LeaseLostError
from flo_coord.models import count_tokens

WORKERS = ("w0", "w1", "w2")
REQUESTS = ("r0", "r1")

workers = st.sampled_from(WORKERS)
requests = st.sampled_from(REQUESTS)
chunks = st.one_of(st.sampled_from(["", " ", "a", "b c", " d e f ", "é✓"]), st.text(max_size=6))
seqs = st.one_of(st.none(), st.none(), st.integers(min_value=1, max_value=12))


@dataclass
class Req:
    """A live request (its ctx hash exists)."""

    owner: str
    epoch: int
    prefix: str = ""
    token_count: int = 0
    last_seq: int = 0
    state: str = "Pending"
    lease_live: bool = True
    takeovers: int = 0


@dataclass
class Holding:
    epoch: int
    next_seq: int


@dataclass
class Lost:
    """The LeaseLostError a call is expected to raise."""

    held_epoch: int
    current_owner: str | None
    current_epoch: int | None
    completed: bool


@dataclass
class Model:
    live: dict[str, Req] = field(default_factory=dict)
    finished: dict[str, tuple[str, int]] = field(default_factory=dict)  # rid -> (owner, epoch) of the outcome
    held: dict[str, dict[str, Holding]] = field(default_factory=lambda: {w: {} for w in WORKERS})

    def refusal(self, rid: str, held_epoch: int) -> Lost:
        """Why a fenced write by a holder of ``held_epoch`` is refused (a Lua ``refusal``/``fence``)."""
        if rid in self.live:
            req = self.live[rid]
            return Lost(held_epoch, req.owner, req.epoch, False)
        if rid in self.finished:
            owner, epoch = self.finished[rid]
            return Lost(held_epoch, owner, epoch, True)
        return Lost(held_epoch, None, None, False)

    def holds(self, worker: str, rid: str, epoch: int) -> bool:
        req = self.live.get(rid)
        return req is not None and req.owner == worker and req.epoch == epoch

    def drop(self, worker: str, rid: str, epoch: int | None = None) -> None:
        held = self.held[worker].get(rid)
        if held is not None and (epoch is None or held.epoch == epoch):
            del self.held[worker][rid]

    # ---- operations: each returns the expected result or a Lost to be raised

    def start(self, worker: str, rid: str) -> int:
        old = max(self.live[rid].epoch if rid in self.live else 0, self.finished.get(rid, ("", 0))[1])
        self.live[rid] = Req(owner=worker, epoch=old + 1)
        self.finished.pop(rid, None)
        self.held[worker][rid] = Holding(old + 1, 1)
        return old + 1

    def append(self, worker: str, rid: str, text: str, seq: int | None) -> AppendAck | Lost | None:
        held = self.held[worker].get(rid)
        number = seq if seq is not None else (held.next_seq if held else 1)
        epoch = held.epoch if held else 0
        if not self.holds(worker, rid, epoch):
            if held is None and rid not in self.live and rid not in self.finished:
                return None  # the original: appending to an unknown request is a no-op
            self.drop(worker, rid, epoch)
            return self.refusal(rid, epoch)
        req = self.live[rid]
        applied = number > req.last_seq
        if applied:
            req.prefix += text
            req.token_count += count_tokens(text)
            req.last_seq = number
            if req.state == "Pending":
                req.state = "Streaming"
        if held is not None:
            held.next_seq = max(held.next_seq, number + 1, req.last_seq + 1)
        return AppendAck(applied=applied, seq=number, length=len(req.prefix.encode()), token_count=req.token_count)

    def heartbeat(self, worker: str) -> int:
        renewed = 0
        for rid, held in list(self.held[worker].items()):
            if self.holds(worker, rid, held.epoch):
                self.live[rid].lease_live = True
                renewed += 1
            else:
                del self.held[worker][rid]
        return renewed

    def expire(self, rid: str) -> None:
        if rid in self.live:
            self.live[rid].lease_live = False

    def claim(self, worker: str, rid: str) -> Req | None:
        req = self.live.get(rid)
        if req is None or req.lease_live:
            return None
        req.owner, req.epoch, req.state, req.lease_live = worker, req.epoch + 1, "Recovered", True
        req.takeovers += 1
        self.held[worker][rid] = Holding(req.epoch, req.last_seq + 1)
        return req

    def release(self, worker: str, rid: str) -> Lost | None:
        held = self.held[worker].get(rid)
        epoch = held.epoch if held else 0
        if not self.holds(worker, rid, epoch):
            self.drop(worker, rid, epoch)
            return self.refusal(rid, epoch)
        self.live[rid].lease_live = False
        self.drop(worker, rid)
        return None

    def complete(self, worker: str, rid: str) -> bool | Lost:
        held = self.held[worker].get(rid)
        epoch = held.epoch if held else 0
        if self.holds(worker, rid, epoch) or (rid not in self.live and self.finished.get(rid) == (worker, epoch)):
            if rid in self.live:
                del self.live[rid]
                self.finished[rid] = (worker, epoch)
            self.drop(worker, rid, epoch)
            return True
        if epoch == 0 and rid not in self.live:
            return False  # unknown or already finished: the original's no-op
        self.drop(worker, rid, epoch)
        return self.refusal(rid, epoch)


class ProtocolMachine(RuleBasedStateMachine):
    store: Any = None  # set by the test that runs the machine

    def __init__(self) -> None:
        super().__init__()
        self.namespace = f"m{uuid.uuid4().hex[:12]}"
        self.managers = {w: self.store.manager(worker_id=w, namespace=self.namespace, lease_ttl=60) for w in WORKERS}
        self.reader = self.store.manager(worker_id="reader", namespace=self.namespace)
        self.client = self.store.sync_client
        self.model = Model()

    @initialize(first=workers, second=workers)
    def start_both_requests(self, first: str, second: str) -> None:
        assert self.reader.stats().active_contexts == 0
        self.start(first, REQUESTS[0], "p")
        self.start(second, REQUESTS[1], "q")

    def _outcome(self, call: Any) -> Any:
        try:
            return call()
        except LeaseLostError as exc:
            return Lost(exc.held_epoch, exc.current_owner, exc.current_epoch, exc.completed)

    @rule(worker=workers, rid=requests, prompt=st.text(max_size=4))
    def start(self, worker: str, rid: str, prompt: str) -> None:
        ctx = self.managers[worker].start_tracking(rid, prompt)
        assert ctx.epoch == self.model.start(worker, rid)
        assert ctx.owner == worker

    @rule(worker=workers, rid=requests, text=chunks, seq=seqs)
    def append(self, worker: str, rid: str, text: str, seq: int | None) -> None:
        actual = self._outcome(lambda: self.managers[worker].append_tokens(rid, text, seq=seq))
        assert actual == self.model.append(worker, rid, text, seq)

    @rule(rid=requests, text=chunks, seq=seqs)
    def owner_appends(self, rid: str, text: str, seq: int | None) -> None:
        """The worker the model says owns the request appends (the common, healthy case)."""
        worker = self._owner(rid)
        actual = self._outcome(lambda: self.managers[worker].append_tokens(rid, text, seq=seq))
        assert actual == self.model.append(worker, rid, text, seq)

    def _owner(self, rid: str) -> str:
        req = self.model.live.get(rid)
        return req.owner if req is not None else WORKERS[0]

    @rule(worker=workers, rid=requests)
    def append_again(self, worker: str, rid: str) -> None:
        """Retry the last applied seq (a reply lost on the way back): never applied twice."""
        req = self.model.live.get(rid)
        seq = req.last_seq if req is not None and req.last_seq > 0 else 1
        actual = self._outcome(lambda: self.managers[worker].append_tokens(rid, "dup ", seq=seq))
        assert actual == self.model.append(worker, rid, "dup ", seq)

    @rule(worker=workers)
    def heartbeat(self, worker: str) -> None:
        assert self.managers[worker].heartbeat() == self.model.heartbeat(worker)

    @rule(rid=requests)
    def expire(self, rid: str) -> None:
        if rid in self.model.live:  # (the invariant has checked that Redis agrees)
            self.client.hset(self.reader.core.keys.request(rid).ctx, "lease", 0)
        self.model.expire(rid)

    @rule(worker=workers, rid=requests)
    def claim(self, worker: str, rid: str) -> None:
        ctx = self.managers[worker].claim(rid)
        expected = self.model.claim(worker, rid)
        if expected is None:
            assert ctx is None
        else:
            assert ctx is not None
            assert (ctx.owner, ctx.epoch, ctx.generated_prefix, ctx.token_count, ctx.last_seq) == (
                expected.owner,
                expected.epoch,
                expected.prefix,
                expected.token_count,
                expected.last_seq,
            )

    @rule(worker=workers, rid=requests)
    def expire_and_claim(self, worker: str, rid: str) -> None:
        """The takeover path: a lease runs out, then a worker claims the request."""
        self.expire(rid)
        self.claim(worker, rid)

    @rule(worker=workers, rid=requests)
    def release(self, worker: str, rid: str) -> None:
        actual = self._outcome(lambda: self.managers[worker].release(rid))
        assert actual == self.model.release(worker, rid)

    @rule(worker=workers, rid=requests)
    def complete(self, worker: str, rid: str) -> None:
        actual = self._outcome(lambda: self.managers[worker].complete(rid))
        assert actual == self.model.complete(worker, rid)

    @rule(rid=requests)
    def owner_completes(self, rid: str) -> None:
        worker = self._owner(rid)
        actual = self._outcome(lambda: self.managers[worker].complete(rid))
        assert actual == self.model.complete(worker, rid)

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        for rid in REQUESTS:
            ctx = self.reader.get_context(rid)
            req = self.model.live.get(rid)
            if req is None:
                assert ctx is None, rid
                outcome = self.reader.outcome(rid)
                if rid in self.model.finished:
                    assert (outcome.state, outcome.owner, outcome.epoch) == ("Completed", *self.model.finished[rid])
                    assert outcome.token_count >= 0
                else:
                    assert outcome is None
                continue
            assert ctx is not None, rid
            assert (ctx.owner, ctx.epoch, ctx.generated_prefix, ctx.token_count, ctx.last_seq, ctx.state) == (
                req.owner,
                req.epoch,
                req.prefix,
                req.token_count,
                req.last_seq,
                req.state,
            ), rid
            assert ctx.takeovers == req.takeovers
            assert (ctx.lease_deadline != 0) == req.lease_live
        for worker, manager in self.managers.items():
            assert sorted(manager.held()) == sorted(self.model.held[worker]), worker
            for rid, held in self.model.held[worker].items():
                actual = manager.core.holding(rid)
                assert (actual.epoch, actual.next_seq) == (held.epoch, held.next_seq), (worker, rid)


def _run(store: Any, max_examples: int, steps: int) -> None:
    machine = type("Machine", (ProtocolMachine,), {"store": store})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        ),
    )


def test_protocol_matches_the_model(store):
    """Parametrised by ``store``: many examples on fakeredis, fewer on the real server."""
    if store.kind == "fakeredis":
        _run(store, max_examples=150, steps=50)
    else:
        _run(store, max_examples=40, steps=40)
