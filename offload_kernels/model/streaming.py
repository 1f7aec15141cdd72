"""WeightStreamer: streams groups of OffloadedLinear weights through the transfer engine.

Each group (usually one transformer block) is one engine item: its layers' GGUF bytes laid out
contiguously in pinned host memory and copied into a device slot with a single copy. The streamer learns
the order in which groups are visited (a visit: consecutive uses of one group's layers) and how many layer
uses each visit has, then prefetches the next groups in that (cyclic) order while the current one computes.
A prediction that turns out wrong costs a demand copy, never a wrong answer: every layer reads its own
item from the slot the engine hands back for that item.

Learning ends at whichever comes first:
  * the end of a root forward pass that completed (an aborted pass discards what it recorded);
  * the first recorded group coming back after every group has been seen: the cycle has closed. This ends
    learning for a root forward that runs the model several times, or for layers used without the root's
    forward (its hooks never fire), instead of recording without end.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import OffloadedLinear

log = logging.getLogger("offload_kernels")


class WeightStreamer:
    """Owns a TransferEngine holding the streamed layers' bytes and drives prefetch/acquire/release."""

    def __init__(self, groups: Sequence[Sequence["OffloadedLinear"]], device: torch.device, num_slots: int = 2):
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("WeightStreamer needs at least one non-empty group of layers")
        from ..engine import TransferEngine

        self.device = torch.device(device)
        self.engine = TransferEngine(device=self.device, num_slots=num_slots)
        self.groups = [list(g) for g in groups]
        self.handles = self.engine.register_many([[m.weight for m in g] for g in self.groups])
        self._parts: list[list[tuple[int, int]]] = [self.engine.item_parts(h) for h in self.handles]
        self._where: dict[int, tuple[int, int]] = {}
        for gi, group in enumerate(self.groups):
            host_parts = self.engine.host_views(self.handles[gi])
            for pi, module in enumerate(group):
                # The module's bytes now live only in the engine's pinned storage (one host copy).
                module._buffers["weight"] = host_parts[pi].view(module.weight.shape)
                module._streamer = self
                self._where[id(module)] = (gi, pi)
        self.order: list[int] = []          # learned cyclic order of group visits
        self._visit_uses: list[int] = []    # layer uses of each visit in `order`
        self._learning = True
        self._seen: list[int] = []          # while learning: the visits so far, and their layer uses
        self._seen_uses: list[int] = []
        self._seen_groups: set[int] = set()
        self._depth = 0                     # root forwards in progress (nested calls of the root)
        self._pos = -1                      # position of the current visit in `order`
        self._current: Optional[int] = None
        self._current_view: Optional[torch.Tensor] = None
        self._visit_count = 0               # layer uses in the current visit
        self._pending: list[int] = []       # prefetched, not yet acquired, in prefetch order
        self.mispredictions = 0
        self._hooks: list = []              # removable handles (the _PassWrapper of each attached root)

    # ------------------------------------------------------------------ pass boundaries
    def attach(self, root: nn.Module) -> None:
        """Mark forward-pass boundaries of ``root``: the first complete pass teaches the order.

        ``root.forward`` is wrapped (an instance attribute; removed again by :meth:`close`) rather than hooked:
        torch calls ``always_call`` forward hooks only for an ``Exception``, so a KeyboardInterrupt in the
        forward would leave the pass open forever. The wrapper's ``finally`` ends the pass whatever is raised.
        Nested calls of ``root`` count as one pass.
        """
        self._hooks.append(_PassWrapper(self, root))

    def begin_pass(self) -> None:
        """Start a pass (``attach``'s wrapper calls this); a pass begun inside another is part of it."""
        if self._depth:
            self._depth += 1
            return
        self._release_current()
        if self._learning:                  # a pass is what we learn from: drop stray uses recorded before it
            self._reset_learning()
        self._pos = len(self.order) - 1
        # Counted last: if anything above raises (the wrapper's try has not begun), no pass was opened that
        # nothing would ever close.
        self._depth = 1

    def _leave_pass(self, completed: bool) -> None:
        """One ``begin_pass`` is over; the outermost one ends the pass (``completed``: it returned)."""
        if self._depth == 0:                # close() or end_pass() already ended it
            return
        self._depth -= 1
        if self._depth == 0:
            self._finish_pass(aborted=not completed)

    def end_pass(self, aborted: bool = False) -> None:
        """End the current pass, however deeply nested; ``aborted``: the forward raised."""
        self._depth = 0
        self._finish_pass(aborted)

    def _finish_pass(self, aborted: bool) -> None:
        self._release_current()
        if self._learning:
            if aborted:                     # a partial order would mispredict every later pass
                log.debug("forward raised while learning the streaming order: learning again next pass")
                self._reset_learning()
            elif self._seen:
                self._finish_learning()
        self._pos = len(self.order) - 1      # the next pass starts at order[0]
        self._prefetch_ahead()

    # ------------------------------------------------------------------ per-layer protocol
    def weight_bytes(self, module: "OffloadedLinear", device: torch.device) -> torch.Tensor:
        """The device bytes of ``module``'s weight, valid until :meth:`after_use`."""
        if torch.device(device).type != self.device.type or (
                self.device.index is not None and torch.device(device).index not in (None, self.device.index)):
            raise ValueError(f"input is on {device} but this layer streams its weight to {self.device}")
        gi, pi = self._where[id(module)]
        if gi != self._current:
            self._switch_to(gi)
        offset, nbytes = self._parts[gi][pi]
        return self._current_view[offset:offset + nbytes]

    def after_use(self, module: "OffloadedLinear") -> None:
        """Called once the layer's kernels are enqueued: frees the slot after the visit's last use."""
        gi, _ = self._where[id(module)]
        if gi != self._current:
            return
        self._visit_count += 1
        if self._learning:
            if self._seen_uses:
                self._seen_uses[-1] += 1
        elif self.order[self._pos] == gi and self._visit_count >= self._visit_uses[self._pos]:
            self._release_current()
            self._prefetch_ahead()

    def invalidate(self, module: "OffloadedLinear") -> None:
        """``module``'s host bytes are about to be rewritten (a state-dict load): drop every device copy of
        its group and wait for copies in flight, so the next use copies the new bytes."""
        gi, _ = self._where[id(module)]
        if gi == self._current:
            if self._depth:
                raise RuntimeError("cannot load new weights into a streamed layer while a forward pass is using "
                                   "its group")
            self._release_current()       # left acquired by layers called outside the root's forward
        if gi in self._pending:
            self._pending.remove(gi)
            self.engine.cancel(self.handles[gi])
        self.engine.invalidate(self.handles[gi])

    # ------------------------------------------------------------------ internals
    def _reset_learning(self) -> None:
        self._seen, self._seen_uses, self._seen_groups = [], [], set()

    def _finish_learning(self) -> None:
        self.order, self._visit_uses = self._seen, self._seen_uses
        self._learning = False
        self._reset_learning()
        self._pos = -1
        log.debug("learned streaming order of %d group visits", len(self.order))

    def _switch_to(self, gi: int) -> None:
        self._release_current()
        if self._learning:
            if self._seen and gi == self._seen[0] and len(self._seen_groups) == len(self.groups):
                self._finish_learning()     # the cycle closed: this visit is order[0] again
            else:
                self._seen.append(gi)
                self._seen_uses.append(0)
                self._seen_groups.add(gi)
        if not self._learning:
            nxt = (self._pos + 1) % len(self.order)
            if self.order[nxt] == gi:
                self._pos = nxt
            else:
                self.mispredictions += 1
                self._pos = self._next_visit_of(gi)
        handle = self.handles[gi]
        if gi in self._pending:
            self._pending.remove(gi)
        else:
            self._make_room()
            self.engine.prefetch(handle)      # demand copy (a hit if the slot still holds it)
        self._current_view = self.engine.acquire(handle)
        self._current = gi
        self._visit_count = 0
        self._prefetch_ahead()

    def _next_visit_of(self, gi: int) -> int:
        """The first visit of ``gi`` after the current position (cyclically); the position itself if the
        learned order never visits ``gi``."""
        n = len(self.order)
        for step in range(1, n + 1):
            if self.order[(self._pos + step) % n] == gi:
                return (self._pos + step) % n
        return self._pos

    def _release_current(self) -> None:
        if self._current is not None:
            # Forgotten only once released: if the release raises, the group is still held, and its view
            # still valid, so the streamer's state matches the engine's.
            self.engine.release(self.handles[self._current])
            self._current = self._current_view = None

    def _make_room(self) -> None:
        """Free a slot for a demand copy by dropping the furthest-ahead prediction if every slot is taken."""
        busy = len(self._pending) + (self._current is not None)
        if busy >= self.engine.num_slots and self._pending:
            self.engine.cancel(self.handles[self._pending.pop()])

    def _prefetch_ahead(self) -> None:
        if self._learning or not self.order:
            return
        free_slots = self.engine.num_slots - (self._current is not None)
        wanted: list[int] = []
        for step in range(1, len(self.order) + 1):
            if len(wanted) == free_slots:
                break
            g = self.order[(self._pos + step) % len(self.order)]
            if g != self._current and g not in wanted:
                wanted.append(g)
        for g in [p for p in self._pending if p not in wanted]:   # wrong guesses give their slots back
            self._pending.remove(g)
            self.engine.cancel(self.handles[g])
        for g in wanted:
            if g not in self._pending:
                self.engine.prefetch(self.handles[g])
                self._pending.append(g)

    # ------------------------------------------------------------------ teardown
    def stats(self) -> dict:
        out = dict(self.engine.stats())
        out["mispredictions"] = self.mispredictions
        out["groups"] = len(self.groups)
        return out

    def close(self) -> None:
        """Detach: layers get private host copies of their bytes (resident on CPU), engine memory is freed."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._depth = 0
        if self.engine.closed:
            return
        self._release_current()
        for g in self._pending:
            self.engine.cancel(self.handles[g])
        self._pending.clear()
        for group in self.groups:
            for module in group:
                module._buffers["weight"] = module.weight.clone()
                module._streamer = None
        self.engine.close()

    def __repr__(self) -> str:
        return (f"WeightStreamer(groups={len(self.groups)}, slots={self.engine.num_slots}, "
                f"slot_bytes={self.engine.slot_bytes}, device={self.device})")


class _PassWrapper:
    """Wraps ``root.forward`` so that every call is one streaming pass, ended in ``finally`` whatever the
    forward raises (KeyboardInterrupt included); ``remove()`` puts the original back, like a hook handle."""

    def __init__(self, streamer: WeightStreamer, root: nn.Module) -> None:
        # The forward found on the instance, if something (accelerate's hooks, say) set one: called and
        # restored as is. Otherwise the class's forward is looked up per call through a weak reference, so
        # the wrapper stored on the root does not keep the root alive in a reference cycle.
        own = root.__dict__.get("forward")
        root_ref = weakref.ref(root)
        self._root, self._own, self.active = root_ref, own, True

        def forward(*args, **kwargs):
            target = own if own is not None else functools.partial(type(root_ref()).forward, root_ref())
            if not self.active:             # removed, but someone wrapped over us: pass straight through
                return target(*args, **kwargs)
            streamer.begin_pass()
            completed = False
            try:
                out = target(*args, **kwargs)
                completed = True
                return out
            finally:
                streamer._leave_pass(completed)

        bound = root.forward
        functools.wraps(bound)(forward)
        # Callers read the forward's parameters (transformers' generate() checks model kwargs against
        # inspect.signature(model.forward)): give the real signature without __wrapped__, which would hold the
        # bound method, and so the root, strongly.
        del forward.__wrapped__
        try:
            forward.__signature__ = inspect.signature(bound)
        except (TypeError, ValueError):     # pragma: no cover - a forward without a signature
            pass
        self._wrapper = forward
        root.forward = forward

    def remove(self) -> None:
        self.active = False
        root = self._root()
        if root is None or root.__dict__.get("forward") is not self._wrapper:
            return                          # gone, or wrapped again by someone else: leave theirs in place
        if self._own is None:
            del root.__dict__["forward"]
        else:
            root.__dict__["forward"] = self._own
