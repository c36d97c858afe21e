"""The host-only scheduler and block manager, without JAX or a model."""
from __future__ import annotations

import subprocess
import sys

from model_server.engine.block_manager import BlockManager, block_hashes
from model_server.engine.requests import Group, Request, RequestHandle, Sequence, Status
from model_server.engine.scheduler import Scheduler
from model_server.engine.types import SamplingParams


def request(prompt, n=1, caching=True) -> Request:
    params = SamplingParams(max_tokens=8, n=n, prefix_caching=caching)
    r = Request("r", list(prompt), params, RequestHandle(None, "r", len(prompt), n), 0.0, "gen", 0)
    r.samples = [Sequence(r, i, list(prompt)) for i in range(n)]
    return r


def group(r: Request) -> Group:
    return Group(list(r.samples), r.prompt)


def test_the_scheduler_imports_without_jax():
    code = "import sys; import model_server.engine.scheduler; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_chained_hashes_name_whole_prefixes():
    a = block_hashes(list(range(40)), 16)
    b = block_hashes(list(range(32)) + [99] * 8, 16)
    c = block_hashes([1] + list(range(1, 40)), 16)
    assert len(a) == 2 and a == b  # the third block is not full
    assert c[0] != a[0] and c[1] != a[1]  # a change in block 0 changes every later key
    assert block_hashes(list(range(40)), 16, b"adapter") != a


def test_freed_blocks_stay_cached_until_needed_lru():
    bm = BlockManager(4, 16)
    blocks = bm.take(2)
    keys = block_hashes(list(range(32)), 16)
    for b, k in zip(blocks, keys):
        bm.register(b, k)
    bm.release(blocks)
    assert bm.free_blocks == 4 and bm.match(keys) == blocks
    bm.take(2)  # the never-cached blocks go first
    assert bm.match(keys) == blocks
    bm.take(1)  # then the least recently freed: the chain's tail (released first)
    assert bm.match(keys) == blocks[:1]


def test_a_shared_prefix_is_not_computed_again():
    bm = BlockManager(64, 16)
    s = Scheduler(bm, num_slots=4, token_budget=64, max_chunk=64, max_seq_len=256)
    first = request(range(50))
    s.add(group(first))
    plan = s.schedule()
    assert [(c.start, c.length) for c in plan.chunks] == [(0, 50)]
    second = request(list(range(48)) + [7, 8, 9])
    s.add(group(second))
    plan = s.schedule()
    assert [(c.start, c.length) for c in plan.chunks] == [(48, 3)]  # three blocks from the cache
    assert second.samples[0].blocks[:3] == first.samples[0].blocks[:3]
    assert bm.hits == 48 and bm.queries == 101
    opted_out = request(range(50), caching=False)
    s.add(group(opted_out))
    assert [(c.start, c.length) for c in s.schedule().chunks] == [(0, 50)]


def test_chunks_follow_the_token_budget_while_others_decode():
    bm = BlockManager(64, 16)
    s = Scheduler(bm, num_slots=4, token_budget=40, max_chunk=64, max_seq_len=256)
    s.add(group(request(range(10))))
    s.schedule()
    long = request(range(100, 200))
    s.add(group(long))
    sizes = []
    while long.samples[0].status is not Status.RUNNING:
        plan = s.schedule()
        assert plan.tokens <= 40 and len(plan.decode) == 1
        sizes += [c.length for c in plan.chunks]
        for seq in plan.decode:
            seq.dispatched += 1
    assert sizes == [39, 39, 22]


def test_running_out_of_blocks_preempts_the_newest_sequence():
    bm = BlockManager(6, 16)
    s = Scheduler(bm, num_slots=2, token_budget=256, max_chunk=64, max_seq_len=64)
    old, new = request(range(30)), request(range(40, 70))
    s.add(group(old))
    s.schedule()
    s.add(group(new))
    s.schedule()
    assert bm.free_blocks == 2
    for _ in range(40):
        plan = s.schedule()
        if plan.preempted:
            break
        for seq in plan.decode:
            seq.dispatched += 1
            seq.tokens.append(1)
            seq.generated += 1
    assert plan.preempted == new.samples and s.preemptions == 1
    assert new.samples[0].status is Status.WAITING and old.samples[0].status is Status.RUNNING
    s.finish(old.samples[0])
    plan = s.schedule()  # recomputed: prompt and what it generated, its prompt blocks cached
    assert [c.group.tokens for c in plan.chunks] == [new.samples[0].tokens]
    assert plan.chunks[0].start == 16


def test_extra_samples_share_full_blocks_and_copy_the_last():
    bm = BlockManager(16, 16)
    s = Scheduler(bm, num_slots=3, token_budget=256, max_chunk=64, max_seq_len=64)
    r = request(range(20), n=3)
    s.add(group(r))
    plan = s.schedule()
    a, b, c = r.samples
    assert a.blocks[0] == b.blocks[0] == c.blocks[0] and bm.refs(a.blocks[0]) == 3
    assert len({a.blocks[1], b.blocks[1], c.blocks[1]}) == 3
    assert plan.copies == [(a.blocks[1], b.blocks[1]), (a.blocks[1], c.blocks[1])]
    assert {x.slot for x in r.samples} == {0, 1, 2}
