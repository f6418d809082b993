"""The invariants under concurrency: many threads, and hypothesis-driven sequences.

Bounded, exclusive, every lease ends, FIFO hand-off, and no connection stranded
when a waiter's timeout races a hand-off.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from connguard.pool import Lease, Pool, PoolConfig, PoolError, TxStatus

from .fakes import FakeConnection, FakeDriver, FakeOperationalError, ManualClock, wait_until


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt or a cancellation: not an ``Exception``."""


def settle(pool: Pool, driver: FakeDriver | None = None) -> None:
    """Wait for opener threads to finish so the books can be checked exactly.

    While the fake database is down one opener keeps retrying (to refill
    ``min_size``) by design, so then only closing must settle.
    """

    def quiet() -> bool:
        stats = pool.stats()
        down = driver is not None and driver.fail_connect is not None
        settled = stats.closing == 0 and stats.resetting == 0
        return settled and (stats.opening == 0 or (down and stats.opening <= 1))

    wait_until(quiet)


def test_many_threads_keep_every_invariant() -> None:
    driver = FakeDriver()
    pool = Pool(
        driver,
        PoolConfig(min_size=2, max_size=6, timeout=2.0, ping_after_idle=None),
        name="stress",
        housekeeping=False,
    )
    threads_n, rounds = 48, 150
    errors: list[BaseException] = []
    outcomes = {"ok": 0, "timeout": 0}
    outcomes_lock = threading.Lock()
    go = threading.Barrier(threads_n)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        go.wait()
        try:
            for _ in range(rounds):
                try:
                    lease = pool.acquire(timeout=rng.choice([0.0005, 0.005, 1.0]))
                except PoolError:
                    with outcomes_lock:
                        outcomes["timeout"] += 1
                    continue
                conn = lease.raw
                assert isinstance(conn, FakeConnection)
                conn.use()
                roll = rng.random()
                if roll < 0.1:
                    conn.status = TxStatus.INTRANS  # left a transaction open
                elif roll < 0.13:
                    conn.alive = False  # the server went away under us
                if rng.random() < 0.3:
                    threading.Event().wait(rng.random() / 2000)
                conn.use()
                lease.release(reset=rng.random() < 0.05)
                if rng.random() < 0.05:
                    lease.release()  # a double release must do nothing
                with outcomes_lock:
                    outcomes["ok"] += 1
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    stop = threading.Event()

    def housekeeping() -> None:
        while not stop.wait(0.002):
            pool.housekeep()
            pool._check_invariants()

    keeper = threading.Thread(target=housekeeping)
    keeper.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    keeper.join()
    assert not errors, errors[:3]
    settle(pool)
    pool._check_invariants()
    stats = pool.stats()
    assert driver.max_live <= 6, "bounded: never more physical connections than max_size"
    assert stats.in_use == 0 and not pool.leases(), "every lease ended"
    assert stats.size == stats.idle == driver.live
    assert outcomes["ok"] + outcomes["timeout"] == threads_n * rounds
    assert stats.releases == outcomes["ok"]
    assert outcomes["ok"] > threads_n * rounds // 3  # a third of the timeouts are 0.5 ms
    pool.close()
    assert driver.live == 0


def test_waiter_timeouts_racing_hand_offs_never_strand_a_connection() -> None:
    """Waiters give up at the same instant connections are handed to them."""
    driver = FakeDriver()
    pool = Pool(driver, PoolConfig(min_size=0, max_size=2), name="race", housekeeping=False)
    for _ in range(300):
        held = [pool.acquire(timeout=1), pool.acquire(timeout=1)]
        results: list[Lease | PoolError] = []
        barrier = threading.Barrier(3)

        def wait_briefly(
            barrier: threading.Barrier = barrier, results: list[Lease | PoolError] = results
        ) -> None:
            barrier.wait()
            try:
                results.append(pool.acquire(timeout=0.0002))
            except PoolError as exc:
                results.append(exc)

        threads = [threading.Thread(target=wait_briefly) for _ in range(2)]
        for t in threads:
            t.start()
        barrier.wait()
        for lease in held:
            lease.release()
        for t in threads:
            t.join()
        got = [r for r in results if isinstance(r, Lease)]
        stats = pool.stats()
        assert stats.in_use == len(got)
        assert stats.idle + stats.in_use == 2, "a connection went missing"
        for lease in got:
            lease.release()
        pool._check_invariants()
    assert pool.stats().idle == 2 and driver.max_live == 2
    pool.close()


class PoolMachine(RuleBasedStateMachine):
    """Random sequences of pool operations against a model of the books."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.driver = FakeDriver()
        self.clock = ManualClock()
        self.max_size = 3
        self.pool = Pool(
            self.driver,
            PoolConfig(
                min_size=1,
                max_size=self.max_size,
                max_lifetime=100.0,
                max_idle=30.0,
                ping_after_idle=10.0,
                leak_threshold=50.0,
                reconnect_backoff=0.001,
                reconnect_backoff_max=0.002,
                background_reset=True,  # the resetter's hand-offs are part of the model
            ),
            name="model",
            clock=self.clock,
            housekeeping=False,
        )
        self.held: set[Lease] = set()
        settle(self.pool, self.driver)

    @rule(target=leases)
    def acquire(self) -> Lease | None:
        room = len(self.held) < self.max_size
        up = self.driver.fail_connect is None
        try:
            lease = self.pool.acquire(timeout=2.0 if room and up else 0.005)
        except PoolError as exc:
            assert not room or not up, exc
            settle(self.pool, self.driver)
            return None
        assert room, "leased more connections than max_size"
        assert lease not in self.held
        conn = lease.raw
        assert all(conn is not other.raw for other in self.held), "leased twice"
        self.held.add(lease)
        settle(self.pool, self.driver)
        return lease

    @rule(
        lease=consumes(leases),
        status=st.sampled_from([TxStatus.IDLE, TxStatus.INTRANS, TxStatus.INERROR]),
        reset=st.booleans(),
        dead=st.booleans(),
    )
    def release(self, lease: Lease | None, status: TxStatus, reset: bool, dead: bool) -> None:
        if lease is None:
            return
        conn = lease.raw
        conn.status = status
        conn.alive = not dead
        lease.release(reset=reset)
        self.held.discard(lease)
        assert not lease.active
        settle(self.pool, self.driver)
        if dead:
            assert conn.closed

    @rule(lease=leases)
    def use_after_release_is_fenced(self, lease: Lease | None) -> None:
        if lease is None or lease.active:
            return
        try:
            _ = lease.connection
        except FakeOperationalError:
            return
        raise AssertionError("an ended lease still reached its connection")

    @rule(lease=consumes(leases), reset=st.booleans())
    def revoke_from_another_thread(self, lease: Lease | None, reset: bool) -> None:
        """A holder is inside a use (a statement running) when another thread ends
        its lease: the statement is cancelled, the holder is fenced, and the slot stays
        counted until the holder lets go, which finishes the release."""
        if lease is None:
            return
        inside, let_go = threading.Event(), threading.Event()
        after: list[BaseException] = []

        def holder() -> None:
            with lease.using() as raw:
                raw.status = TxStatus.ACTIVE
                inside.set()
                let_go.wait(5)
                raw.status = TxStatus.INERROR  # "canceling statement due to user request"
            try:
                lease.enter()
            except FakeOperationalError as exc:
                after.append(exc)

        thread = threading.Thread(target=holder)
        thread.start()
        assert inside.wait(5)
        conn = lease.raw
        cancels = conn.cancels
        in_use = self.pool.stats().in_use
        lease.release(reset=reset)  # from this thread, while the holder is inside
        assert not lease.active, "a revoked lease must be fenced at once"
        assert conn.cancels == cancels + 1, "the running statement was not cancelled"
        assert self.pool.stats().in_use == in_use, "the slot was freed under a running use"
        assert not conn.closed, "closed under a running statement"
        let_go.set()
        thread.join(5)
        wait_until(lambda: lease._conn is None)  # finished by the holder (or the resetter)
        assert after, "the holder reached its connection after the lease ended"
        self.held.discard(lease)
        settle(self.pool, self.driver)
        assert conn.status is TxStatus.IDLE or conn.closed, "went back without a rollback"

    @precondition(lambda self: len(self.held) == self.max_size)
    @rule()
    def interrupt_a_waiter(self) -> None:
        """A waiter interrupted by an exception that is not the timeout (here a signal
        handler's, as with KeyboardInterrupt) leaves the queue and strands no slot."""
        main = threading.get_ident()

        def handler(signum: int, frame: object) -> None:
            raise Interrupted

        def interrupter() -> None:
            wait_until(lambda: self.pool.stats().waiting == 1)
            signal.pthread_kill(main, signal.SIGUSR1)

        previous = signal.signal(signal.SIGUSR1, handler)
        thread = threading.Thread(target=interrupter)
        thread.start()
        try:
            self.pool.acquire(timeout=5)
            raise AssertionError("acquired past max_size")
        except Interrupted:
            pass
        finally:
            thread.join(5)
            signal.signal(signal.SIGUSR1, previous)
        assert self.pool.stats().waiting == 0, "an interrupted waiter is still queued"

    @rule()
    def fork(self) -> None:
        """A child process starts the pool with clean counters and only connections
        of its own (it refills ``min_size``), drops (never closes) what it inherited,
        and can use the pool; the parent is untouched."""
        settle(self.pool, self.driver)
        before = self.pool.stats()
        closes = self.driver.closes
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            code = 1
            try:
                stats = self.pool.stats()
                inherited = [lease.raw for lease in self.held if lease.active]
                problems = []
                if stats.in_use or stats.acquires or stats.releases:
                    problems.append(f"counters or leases not clean: {stats}")
                with self.pool._lock:
                    kept = [conn.raw for conn in self.pool._idle]
                if any(raw.pid != os.getpid() for raw in kept):
                    problems.append("an inherited connection is idle in the child")
                if inherited:
                    problems.append("an inherited lease still reaches its connection")
                if self.driver.closes != closes:
                    problems.append("closed an inherited connection")
                if self.driver.fail_connect is None:
                    lease = self.pool.acquire(timeout=2)
                    lease.raw.use()
                    lease.release()
                self.pool._check_invariants()
                os.write(write, "; ".join(problems).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            problems = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
        assert not problems, problems
        after = self.pool.stats()
        counts = (after.in_use, after.acquires, after.releases)
        assert counts == (before.in_use, before.acquires, before.releases), "the fork changed them"
        assert all(lease.active for lease in self.held), "the fork ended a parent's lease"

    @rule(seconds=st.sampled_from([1.0, 11.0, 31.0, 51.0, 101.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def housekeep(self) -> None:
        self.pool.housekeep()
        settle(self.pool, self.driver)

    @rule()
    def kill_an_idle_connection(self) -> None:
        with self.pool._lock:
            if self.pool._idle:
                self.pool._idle[0].raw.alive = False

    @precondition(lambda self: self.driver.fail_connect is None)
    @rule()
    def database_goes_down(self) -> None:
        self.driver.fail_connect = FakeOperationalError("down")

    @precondition(lambda self: self.driver.fail_connect is not None)
    @rule()
    def database_comes_back(self) -> None:
        self.driver.fail_connect = None
        pool = self.pool
        wait_until(lambda: pool._failed_at + pool._backoff_delay < time.monotonic())

    @invariant()
    def books_balance(self) -> None:
        self.pool._check_invariants()
        stats = self.pool.stats()
        assert stats.in_use == len(self.held)
        assert self.driver.max_live <= self.max_size
        assert self.driver.live == stats.size - stats.opening

    def teardown(self) -> None:
        for lease in list(self.held):
            lease.release()
        self.pool.close()
        wait_until(lambda: self.pool.stats().size == 0)
        assert self.driver.live == 0, "a connection outlived its pool"


PoolMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pool_state_machine = PoolMachine.TestCase
