"""ExpertCache: the experts a MoE layer's tokens chose, copied to the device on demand into an LRU cache.

Streaming a MoE block whole moves all E experts over the link for every forward, though a token uses k of
them (Qwen3-30B-A3B: 8 of 128, Mixtral: 2 of 8). With ``offload(..., experts="on_demand")`` the expert
stacks of the blocks that stream stay in pinned host memory instead (planner.plan_with_expert_cache), and
each OffloadedExperts call copies only the experts its tokens were routed to, into a cache of ``num_slots``
expert-sized device slots. An expert still in the cache is not copied again (least recently used slots are
reused first), so with skewed routing or a large cache fewer bytes still cross the link.

Each slot holds one expert's gate_up (or up) rows followed, at a 256-byte offset, by its down rows. The
copies of a call's missing experts are enqueued ahead (as many as there are slots not in use by the
call) on a copy stream, so copying the next expert overlaps computing this one; events order the copy of
a slot after the kernels that last read it, and the kernels after the copy. On the CPU the copies are plain
synchronous copies into host slots (the same logic, for tests and the CPU path).

Routing is only known once the router ran, so a layer's own copies start at its call: this trades the
prefetch across layers (which whole-block streaming has) for copying k/E of the bytes. With
``prefetch=True`` (``offload(..., expert_prefetch=True)``) each layer also guesses the next on-demand layer's
experts by applying that layer's router to its own input (the residual stream changes little from one
block to the next; the speculative loading of Eliseev and Mazur, 2023) and copies the guessed experts
after its own kernels are enqueued, so those copies overlap the next block's attention. A wrong guess costs
link bytes, never results: the next layer copies what it actually chose as before. ``stats()`` counts the
guesses (``prefetched``), those the next layer used (``prefetch_hits``) and those evicted unused.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, NamedTuple, Optional, Sequence

import torch

from ..formats import QuantizedTensor
from .planner import expert_slot_bytes_for

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import OffloadedExperts, OffloadedLinear

def expert_slot_bytes(module: "OffloadedExperts") -> int:
    """Bytes of a cache slot for one expert of ``module`` (planner.expert_slot_bytes_for)."""
    up, down = (module._modules[name] for name in module._expert_shapes)
    e = module.num_experts
    return expert_slot_bytes_for(up.weight_nbytes // e, down.weight_nbytes // e)


class _Geometry(NamedTuple):
    """Where one module's experts sit: its index in the cache, its projections, each expert's rows and bytes
    per projection, and the down rows' offset in a slot."""

    module: int
    up: "OffloadedLinear"
    down: "OffloadedLinear"
    up_rows: int
    down_rows: int
    up_bytes: int
    down_bytes: int
    offset: int


class ExpertCache:
    """Owns the device slots and the host bytes of the on-demand experts of several OffloadedExperts modules.

    The modules' projection children keep their bytes in (pinned, on CUDA) host memory and name this cache
    as their streamer: ``.to()`` leaves the bytes on the host and a state-dict load drops their cached
    copies (:meth:`invalidate`).
    """

    def __init__(self, modules: Sequence["OffloadedExperts"], device: "torch.device | str", num_slots: int,
                 prefetch: bool = False):
        if not modules:
            raise ValueError("ExpertCache needs at least one OffloadedExperts module")
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self.num_slots = num_slots
        self.modules = list(modules)
        self.slot_bytes = max(expert_slot_bytes(m) for m in self.modules)
        self._slots = torch.empty(num_slots, self.slot_bytes, dtype=torch.uint8, device=self.device)
        self._key_of: list[Optional[tuple[int, int]]] = [None] * num_slots   # (module index, expert) per slot
        self._slot_of: dict[tuple[int, int], int] = {}
        self._lru: "OrderedDict[int, None]" = OrderedDict((s, None) for s in range(num_slots))  # first: oldest
        self._index = {id(m): i for i, m in enumerate(self.modules)}
        self._owner: dict[int, int] = {}            # id(projection child) -> module index
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in range(num_slots)]   # the slot's copy is done
            self._free = [torch.cuda.Event() for _ in range(num_slots)]    # the kernels reading the slot are done
            self._used = [False] * num_slots
        self.hits = self.misses = self.bytes_copied = 0
        self.prefetched = self.prefetch_hits = self.prefetch_wasted = 0
        self._guessed: set[tuple[int, int]] = set()        # prefetched keys not used yet
        self.prefetch = bool(prefetch)
        for i, m in enumerate(self.modules):
            for child in (m._modules[name] for name in m._expert_shapes):
                if self._cuda:
                    child._buffers["weight"] = child.weight.cpu().pin_memory()
                elif child.weight.device.type != "cpu":
                    child._buffers["weight"] = child.weight.cpu()
                child._streamer = self
                self._owner[id(child)] = i
            m._expert_cache = self

    # ------------------------------------------------------------------ the experts of one call
    def experts(self, module: "OffloadedExperts", experts: Sequence[int]
                ) -> Iterator[tuple[int, QuantizedTensor, QuantizedTensor]]:
        """Yield ``(expert, up, down)`` device QuantizedTensors for each of ``experts`` in order, valid until the
        next one is asked for: enqueue the kernels that read them before that. Copies run ahead by as many
        experts as there are slots."""
        g = self._geometry(module)
        (up_rows, k_up), (down_rows, k_down) = module._expert_shapes.values()
        locked: set[int] = set()                   # slots of experts issued and not yet computed
        issued = 0
        previous: Optional[int] = None
        try:
            for i, e in enumerate(experts):
                if previous is not None:         # the consumer enqueued its kernels: the slot may be reused
                    self._done_reading(previous)
                    locked.discard(previous)
                    previous = None
                while issued < len(experts) and (issued <= i or len(locked) < self.num_slots):
                    locked.add(self._place(g, experts[issued], locked))
                    issued += 1
                s = self._slot_of[(g.module, e)]
                if self._cuda:
                    torch.cuda.current_stream(self.device).wait_event(self._ready[s])
                slot = self._slots[s]
                up = QuantizedTensor._from_validated(slot[:g.up_bytes].view(up_rows, -1), g.up._spec,
                                                     (up_rows, k_up))
                down = QuantizedTensor._from_validated(slot[g.offset:g.offset + g.down_bytes].view(down_rows, -1),
                                                       g.down._spec, (down_rows, k_down))
                previous = s
                yield e, up, down
        finally:
            if previous is not None:
                self._done_reading(previous)

    @contextmanager
    def resident(self, module: "OffloadedExperts", experts: Sequence[int]
                 ) -> Iterator[tuple[dict[int, int], torch.Tensor, torch.Tensor]]:
        """All of ``experts`` (at most ``num_slots``) in the cache at once, for one grouped launch per
        projection: yields ``({expert: slot}, up bytes, down bytes)``, the flat uint8 buffers in which slot s's
        up (gate_up) and down rows start at byte s * slot_bytes. Kernels reading them must be enqueued before
        the block exits (the slots may then be reused by later copies, after those kernels)."""
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts cannot be resident in a cache of {self.num_slots} slots")
        g = self._geometry(module)
        locked: set[int] = set()
        try:
            for e in experts:
                locked.add(self._place(g, e, locked))
            if self._cuda:
                stream = torch.cuda.current_stream(self.device)
                for s in locked:
                    stream.wait_event(self._ready[s])
            flat = self._slots.view(-1)
            yield {e: self._slot_of[(g.module, e)] for e in experts}, flat, flat[g.offset:]
        finally:
            for s in locked:
                self._done_reading(s)

    def _geometry(self, module: "OffloadedExperts") -> "_Geometry":
        up, down = (module._modules[name] for name in module._expert_shapes)
        (up_rows, _), (down_rows, _) = module._expert_shapes.values()
        up_bytes, down_bytes = up_rows * up.weight.shape[1], down_rows * down.weight.shape[1]
        # the down rows start after the aligned up rows
        return _Geometry(self._index[id(module)], up, down, up_rows, down_rows, up_bytes, down_bytes,
                         expert_slot_bytes_for(up_bytes, 0))

    def _place(self, g: "_Geometry", e: int, locked: set, guess: bool = False) -> int:
        """The slot holding expert ``e`` of module ``g.module``, copying it there (into the least recently
        used slot not ``locked``) if it is not cached. ``guess``: a prefetch, counted as such."""
        key = (g.module, e)
        s = self._slot_of.get(key)
        if s is not None:
            if not guess:
                self.hits += 1
                if key in self._guessed:
                    self._guessed.discard(key)
                    self.prefetch_hits += 1
            self._lru.move_to_end(s)
            return s
        s = next(slot for slot in self._lru if slot not in locked)
        old = self._key_of[s]
        if old is not None:
            del self._slot_of[old]
            if old in self._guessed:
                self._guessed.discard(old)
                self.prefetch_wasted += 1
        self._key_of[s] = key
        self._slot_of[key] = s
        self._lru.move_to_end(s)
        if guess:
            self.prefetched += 1
            self._guessed.add(key)
        else:
            self.misses += 1
        self.bytes_copied += g.up_bytes + g.down_bytes
        up_src = g.up.weight[e * g.up_rows:(e + 1) * g.up_rows].reshape(-1)
        down_src = g.down.weight[e * g.down_rows:(e + 1) * g.down_rows].reshape(-1)
        slot = self._slots[s]
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                if self._used[s]:                # not before the kernels that read the slot's last expert
                    self._copy_stream.wait_event(self._free[s])
                slot[:g.up_bytes].copy_(up_src, non_blocking=True)
                slot[g.offset:g.offset + g.down_bytes].copy_(down_src, non_blocking=True)
                self._ready[s].record(self._copy_stream)
        else:
            slot[:g.up_bytes].copy_(up_src)
            slot[g.offset:g.offset + g.down_bytes].copy_(down_src)
        return s

    def prefetch_experts(self, module: "OffloadedExperts", experts: Sequence[int]) -> None:
        """Copy ``module``'s ``experts`` into the cache ahead of its call (at most ``num_slots``; those cached
        already just become the most recently used). Call it with no kernels of the caller still to be
        enqueued on the slots it released: the copies wait for the kernels that last read their slots."""
        g = self._geometry(module)
        for e in list(experts)[:self.num_slots]:
            self._place(g, e, set(), guess=True)

    def link_next_layers(self, model: torch.nn.Module) -> int:
        """For speculative prefetch: give each cached module but the last the next one and that one's router
        (the module beside it in its MoE block whose weight is (num_experts, hidden)). Returns how many were
        linked (a next layer without a recognizable router gets no guesses)."""
        parent_of = {id(child): parent for parent in model.modules() for child in parent.children()}
        linked = 0
        for m, nxt in zip(self.modules, self.modules[1:]):
            router = find_router(parent_of.get(id(nxt)), nxt)
            m._prefetch_next = (nxt, router) if router is not None else None
            linked += router is not None
        return linked

    def _done_reading(self, s: int) -> None:
        """The kernels reading slot ``s`` are enqueued: a later copy into it waits for them."""
        if self._cuda:
            self._free[s].record(torch.cuda.current_stream(self.device))
            self._used[s] = True

    # ------------------------------------------------------------------ the projection children's streamer
    def weight_bytes(self, module: "OffloadedLinear", device: torch.device) -> torch.Tensor:
        """A projection child called on its own (not through its OffloadedExperts): a copy of all its bytes."""
        return module.weight.to(device).reshape(-1)

    def after_use(self, module: "OffloadedLinear") -> None:
        pass

    def invalidate(self, module: "OffloadedLinear") -> None:
        """``module``'s host bytes are about to be rewritten (a state-dict load): forget every cached expert of
        its OffloadedExperts, after the copies in flight."""
        mi = self._owner[id(module)]
        if self._cuda:
            self._copy_stream.synchronize()
        for key in [k for k in self._slot_of if k[0] == mi]:
            s = self._slot_of.pop(key)
            self._key_of[s] = None
            self._lru.move_to_end(s, last=False)     # reused first
            self._guessed.discard(key)

    # ------------------------------------------------------------------ teardown
    def stats(self) -> dict:
        cached = len(self._slot_of)
        return {"num_slots": self.num_slots, "slot_bytes": self.slot_bytes, "device_bytes": self._slots.numel(),
                "experts_cached": cached, "hits": self.hits, "misses": self.misses,
                "bytes_copied": self.bytes_copied, "prefetched": self.prefetched,
                "prefetch_hits": self.prefetch_hits, "prefetch_wasted": self.prefetch_wasted}

    def reset_stats(self) -> None:
        self.hits = self.misses = self.bytes_copied = 0
        self.prefetched = self.prefetch_hits = self.prefetch_wasted = 0

    def close(self) -> None:
        """Detach: the modules keep their host bytes (resident on the CPU), the device slots are freed."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        for m in self.modules:
            for child in (m._modules[name] for name in m._expert_shapes):
                child._streamer = None
            m._expert_cache = None
            m._prefetch_next = None
        self._slot_of.clear()
        self._slots = torch.empty(0, dtype=torch.uint8, device=self.device)

    def __repr__(self) -> str:
        return (f"ExpertCache(modules={len(self.modules)}, slots={self.num_slots}, slot_bytes={self.slot_bytes}, "
                f"device={self.device})")


def find_router(block: "torch.nn.Module | None", experts: "OffloadedExperts") -> "torch.nn.Module | None":
    """The router of ``experts`` in its MoE ``block``: the other child whose float ``weight`` is
    (num_experts, hidden) (transformers' TopKRouter modules, or a gate nn.Linear); None if there is none."""
    if block is None:
        return None
    for child in block.children():
        w = getattr(child, "weight", None)
        if (child is not experts and isinstance(w, torch.Tensor) and w.is_floating_point()
                and tuple(w.shape) == (experts.num_experts, experts.hidden_size)):
            return child
    return None
