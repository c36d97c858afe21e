"""The host-only scheduler: which sequences decode, which prompt chunks prefill, which
sequences are preempted, each engine step (no JAX here; tests drive it directly).

Each step has a token budget. Running sequences decode first (one token each, and each gets
the block its next position needs: when the pool is out of blocks the most recently started
sequences are preempted, their blocks freed and their tokens recomputed later). Then chunks
of the prompts being prefilled, oldest first, and of newly admitted requests, up to the
budget. A request is admitted when slots (decode rows) for all its samples and blocks for its
prompt are free; its leading full blocks already in the prefix cache are shared, not
computed. When nothing decodes, prompts prefill up to `idle_budget` tokens in the step, in chunks of at
most `max_chunk`. A request for a LoRA adapter is admitted once its adapter holds a slot of the
stack (`AdapterSlots`), and its blocks' cache keys are salted by the adapter.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Optional

from model_server.engine.block_manager import BlockManager, block_hashes
from model_server.engine.lora_slots import AdapterSlots
from model_server.engine.requests import Group, Sequence, Status

#: The shortest chunk worth a prefill call while the budget is nearly spent.
MIN_CHUNK = 16


@dataclasses.dataclass
class Chunk:
    group: Group
    start: int
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length == len(self.group.tokens)


@dataclasses.dataclass
class Plan:
    decode: list[Sequence] = dataclasses.field(default_factory=list)
    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    #: sequences preempted this step (their slots are free now)
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    #: (source, destination) blocks: the last partial prompt block of each extra sample
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, *, num_slots: int, token_budget: int, max_chunk: int,
                 max_seq_len: int, salt: bytes = b"", idle_budget: int = 0,
                 adapters: Optional[AdapterSlots] = None):
        self.blocks = blocks
        self.num_slots = num_slots
        self.token_budget = token_budget
        self.max_chunk = max_chunk
        #: prompt tokens of a step in which nothing decodes
        self.idle_budget = max(idle_budget, max_chunk)
        self.max_blocks = blocks.blocks_for(max_seq_len)
        self.salt = salt
        self.adapters = adapters
        self.waiting: collections.deque[Group] = collections.deque()
        self.prefilling: list[Group] = []
        self.running: list[Sequence] = []
        self.free_slots: list[int] = list(range(num_slots))
        self.preemptions = 0
        #: slots freed since `take_released` (the runner clears their rows)
        self.released: list[int] = []
        self._keys: dict[int, list[bytes]] = {}  # id(group) -> its blocks' keys
        self._to_register: list[tuple[int, bytes]] = []

    # ------------------------------------------------------------------ queue

    def add(self, group: Group) -> None:
        self.waiting.append(group)

    def waiting_samples(self) -> int:
        return sum(len(g.seqs) for g in self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or (self.waiting and self._admissible(self.waiting[0])))

    def _admissible(self, g: Group) -> bool:
        return len(g.seqs) <= len(self.free_slots) and all(s.inflight == 0 for s in g.seqs)

    # ------------------------------------------------------------------ step

    def schedule(self) -> Plan:
        plan = Plan()
        self._grow_decodes(plan)
        plan.decode = [s for s in self.running if s.status is Status.RUNNING]
        busy = bool(plan.decode)
        budget = max(self.token_budget - len(plan.decode), 0) if busy else self.idle_budget
        for g in list(self.prefilling):
            budget = self._plan_chunks(g, budget, plan)
        while budget >= MIN_CHUNK and self.waiting and self._admissible(self.waiting[0]):
            if not self._admit(self.waiting[0]):
                break
            budget = self._plan_chunks(self.waiting.popleft(), budget, plan)
        for block, key in self._to_register:
            self.blocks.register(block, key)
        self._to_register = []
        return plan

    def _grow_decodes(self, plan: Plan) -> None:
        bs = self.blocks.block_size
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue
            index = seq.next_position // bs
            if index < len(seq.blocks) or index >= self.max_blocks:
                continue
            while self.blocks.free_blocks < 1:
                victim = self._victim(seq)
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                seq.blocks += self.blocks.take(1)

    def _victim(self, seq: Sequence):
        """The most recently started sequence other than `seq`, else a prompt being prefilled,
        else `seq` itself."""
        for other in reversed(self.running):
            if other is not seq and other.status is Status.RUNNING:
                return other
        if self.prefilling:
            return self.prefilling[-1]
        return seq

    def _preempt(self, victim, plan: Plan) -> None:
        self.preemptions += 1
        if isinstance(victim, Group):
            self.prefilling.remove(victim)
            for s in victim.seqs:
                self._free(s)
                s.num_computed = 0
                s.status = Status.WAITING
                plan.preempted.append(s)
            self._keys.pop(id(victim), None)
            self.waiting.appendleft(victim)
            return
        seq = victim
        self.running.remove(seq)
        self._free(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.preemptions += 1
        plan.preempted.append(seq)
        self.waiting.appendleft(Group([seq], seq.tokens))

    # ------------------------------------------------------------------ admission

    def _salt(self, adapter: Optional[str]) -> bytes:
        return self.salt if adapter is None or self.adapters is None else self.salt + self.adapters.salt(adapter)

    def _caching(self, g: Group) -> bool:
        return self.blocks.enable_caching and g.req.params.prefix_caching

    def _admit(self, g: Group) -> bool:
        """Slots and blocks for `g`, its cached prefix shared; False if the pool is short."""
        g.tokens = list(g.leader.tokens) if g.leader.generated else g.tokens
        n, total = len(g.tokens), len(g.seqs)
        bm, bs = self.blocks, self.blocks.block_size
        keys = block_hashes(g.tokens, bs, self._salt(g.req.adapter)) if self._caching(g) else []
        # at least the last token is computed (its logits are sampled), so a block holding it
        # is never shared
        hits = bm.match(keys[:(n - 1) // bs])
        fresh = bm.blocks_for(n) - len(hits) + (total - 1 if n % bs else 0)
        reviving = sum(1 for b in hits if bm.refs(b) == 0)
        if fresh + reviving > bm.free_blocks:
            return False
        lora_slot = None
        if g.req.adapter is not None:
            assert self.adapters is not None
            lora_slot = self.adapters.acquire(g.req.adapter, total)
            if lora_slot is None:  # every adapter slot is held: wait for one
                return False
        if self._caching(g):
            bm.count_lookup(n, len(hits) * bs)
        bm.share(hits)
        leader = g.leader
        leader.blocks = hits + bm.take(bm.blocks_for(n) - len(hits))
        g.cached = len(hits) * bs
        leader.num_computed = g.cached
        for s in g.seqs:
            s.slot = self.free_slots.pop(0)
            s.lora_slot = lora_slot
            s.status = Status.PREFILL
        self._keys[id(g)] = keys
        self.prefilling.append(g)
        return True

    def _plan_chunks(self, g: Group, budget: int, plan: Plan) -> int:
        leader = g.leader
        remaining = len(g.tokens) - leader.num_computed
        take = min(remaining, budget, self.max_chunk)
        if take <= 0 or (take < remaining and take < MIN_CHUNK):
            return budget
        chunk = Chunk(g, leader.num_computed, take)
        leader.num_computed += take
        plan.chunks.append(chunk)
        keys = self._keys.get(id(g), [])
        bs = self.blocks.block_size
        # offered to others from the next step on: this step's prefill calls run in any order
        for i in range(chunk.start // bs, min(len(keys), leader.num_computed // bs)):
            self._to_register.append((leader.blocks[i], keys[i]))
        if chunk.last:
            self._start_decoding(g, plan)
        return budget - take

    def _start_decoding(self, g: Group, plan: Plan) -> None:
        self.prefilling.remove(g)
        self._keys.pop(id(g), None)
        n, bs = len(g.tokens), self.blocks.block_size
        leader = g.leader
        full = n // bs
        for s in g.seqs:
            if s is not leader:
                self.blocks.share(leader.blocks[:full])
                s.blocks = leader.blocks[:full]
                if n % bs:
                    dst = self.blocks.take(1)[0]
                    plan.copies.append((leader.blocks[full], dst))
                    s.blocks = s.blocks + [dst]
                s.num_computed = n
            s.status = Status.RUNNING
            s.activated_len = n
            s.dispatched = 0
            self.running.append(s)

    # ------------------------------------------------------------------ leaving

    def expire(self, older_than: float) -> list[Group]:
        """Take out the waiting groups of requests never admitted that arrived before
        `older_than` (preempted sequences are never expired: they are recomputed)."""
        out = [g for g in self.waiting if g.arrival < older_than and g.req.admitted == 0.0
               and not any(s.generated for s in g.seqs)]
        for g in out:
            self.waiting.remove(g)
            for s in g.seqs:
                s.status = Status.FINISHED
        return out

    def finish(self, seq: Sequence) -> None:
        """`seq` is done (finished, cancelled): its slot and blocks go back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._register_generated(seq)
        elif seq.status is Status.PREFILL:
            g = next((g for g in self.prefilling if seq in g.seqs), None)
            if g is not None:
                g.seqs.remove(seq)
                if not g.seqs or seq is g.leader:
                    self.prefilling.remove(g)
                    self._keys.pop(id(g), None)
                    for s in g.seqs:  # the others lose their leader: they finish with it
                        self._free(s)
                        s.status = Status.FINISHED
        elif seq.status is Status.WAITING:
            for g in list(self.waiting):
                if seq in g.seqs:
                    g.seqs.remove(seq)
                    if not g.seqs:
                        self.waiting.remove(g)
        self._free(seq)
        seq.status = Status.FINISHED

    def _register_generated(self, seq: Sequence) -> None:
        """Cache the full blocks of what `seq` generated (a later turn of a chat reuses them)."""
        if not self._caching_seq(seq):
            return
        written = min(seq.next_position, len(seq.tokens))
        bs = self.blocks.block_size
        keys = block_hashes(seq.tokens[:written], bs, self._salt(seq.req.adapter))
        for i in range(seq.activated_len // bs, min(len(keys), len(seq.blocks))):
            self.blocks.register(seq.blocks[i], keys[i])

    def _caching_seq(self, seq: Sequence) -> bool:
        return self.blocks.enable_caching and seq.req.params.prefix_caching

    def _free(self, seq: Sequence) -> None:
        if seq.blocks:
            self.blocks.release(seq.blocks)
            seq.blocks = []
        if seq.lora_slot is not None:
            if self.adapters is not None:
                self.adapters.release(seq.lora_slot)
            seq.lora_slot = None
        if seq.slot is not None:
            bisect.insort(self.free_slots, seq.slot)
            self.released.append(seq.slot)
            seq.slot = None

    def take_released(self) -> list[int]:
        out, self.released = self.released, []
        return out
