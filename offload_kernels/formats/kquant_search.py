"""ggml's per-group scale searches (make_qkx2_quants, make_qx_quants, make_q3_quants), vectorized.

All functions take groups position-major: ``x[i]`` is position i of every group, a contiguous row, so
each step of ggml's loops over a group's positions is one torch op over all groups (and all search
candidates) at once. ggml accumulates every ``s += term`` as a sequential fp32 sum over i = 0..n-1;
here too, one in-place add per position, never torch.sum (which reorders).

Where a search rounds with nearest_int inside its hot loop, the argument is checked (or proven) to be
within (-2^22, 2^22) and not NaN, where ``torch.round`` (half to even) is nearest_int and cheaper.
Big temporaries come from the caller's Scratch, so chunk after chunk reuses the same memory.
"""

from __future__ import annotations

import numpy as np
import torch

from .kquant_arith import (GROUP_MAX_EPS, Scratch, divide, f32, first_absmax, lane_mask, nearest_int_,
                           nearest_int_exact, select, sequential_dot, sequential_sum)

_NEAREST_INT_SAFE = 2.0 ** 22  # below this magnitude nearest_int is round-half-even (torch.round)


# ----------------------------------------------------------------------------------------------------
# make_qkx2_quants: q4_k (nmax 15) and q5_k (nmax 31) on 32-weight groups, weighted least squares with
# min and squared errors; q2_k (nmax 3) on 16-weight groups with absolute errors (use_mad).
#
# The candidate steps are NOT independent: a step that lowers the error also replaces `min`, and every
# later step quantizes x - min against max - min with the new value. So the steps run in order, as in
# ggml, each one vectorized over all groups.

_POSITION_TILE = 8          # positions per elementwise op: bigger ops, temporaries still cache-sized


def _qkx2_numerators(nmax: int, rmin: float, rdelta: float, nstep: int) -> np.ndarray:
    """fp32 ``rmin + rdelta*is + nmax`` for is = 0..nstep, evaluated left to right as the C expression."""
    is_ = np.arange(nstep + 1, dtype=np.float32)
    return (np.float32(rmin) + np.float32(rdelta) * is_) + np.float32(nmax)


class _Qkx2Search:
    """Inputs, invariants and scratch buffers of one make_qkx2_quants run on (npos, ngroups) groups."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor, nmax: int, use_mad: bool, scratch: Scratch):
        npos, ngroups = x.shape
        self.nmax = nmax
        self.use_mad = use_mad
        self.lo_x = torch.amin(x, dim=0)
        self.hi = torch.amax(x, dim=0)
        self.lo = self.lo_x.clamp(max=0.0)                       # ggml: if (min > 0) min = 0
        self.flat = self.hi == self.lo                            # ggml returns L = 0, scale 0 at once
        # Flat groups get harmless inputs (results replaced at the end) so the search stays finite.
        self.kept = (~self.flat).float()
        self.x = torch.mul(x, self.kept, out=scratch.take(npos, ngroups))
        self.hi = torch.where(self.flat, 1.0, self.hi)
        self.lo_x = self.lo_x * self.kept
        self.w = weights
        self.sum_w = sequential_sum(weights, start_at_zero=False)
        self.sum_x = sequential_dot(weights, self.x, start_at_zero=False)
        self.quants = scratch.take(npos, ngroups)
        tile = min(_POSITION_TILE, npos)
        # terms[p, k]: the k-th sum's term at position p of a tile; the three sums advance together
        self.terms = scratch.take(tile, 3, ngroups)
        self.diff = scratch.take(tile, ngroups)

    def quantize(self, iscale: torch.Tensor, the_min: torch.Tensor) -> torch.Tensor:
        """MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) as fp32, in the shared quants buffer."""
        # x - min lies in [lo_x - min, hi - min] (fp subtraction is monotonic in x)
        reach = torch.maximum(self.hi - the_min, the_min - self.lo_x)
        in_range = bool((torch.abs(iscale) * reach < _NEAREST_INT_SAFE).all())
        out = torch.sub(self.x, the_min, out=self.quants).mul_(iscale)
        if in_range:
            return out.round_().clamp_(0.0, float(self.nmax))
        return out.copy_(nearest_int_exact(out).clamp_(0, self.nmax))

    def sums(self, quants: torch.Tensor) -> torch.Tensor:
        """(3, ngroups): sum_l, sum_l2, sum_xl, the sums of w*l, (w*l)*l, (w*l)*x, each sequential from 0."""
        acc = torch.zeros_like(self.terms[0])
        terms = self.terms
        tile = terms.shape[0]
        for p in range(0, quants.shape[0], tile):
            q, x, w = quants[p:p + tile], self.x[p:p + tile], self.w[p:p + tile]
            wl = torch.mul(w, q, out=terms[:, 0])
            torch.mul(wl, q, out=terms[:, 1])
            torch.mul(wl, x, out=terms[:, 2])
            for term in terms:
                acc.add_(term)
        return acc

    def error(self, scale: torch.Tensor, the_min: torch.Tensor, quants: torch.Tensor) -> torch.Tensor:
        """sum_i w*((scale*L + min - x)^2), or w*|scale*L + min - x| with use_mad, ggml's order, from 0.f."""
        err = torch.zeros_like(scale)
        diff = self.diff
        tile = diff.shape[0]
        for p in range(0, quants.shape[0], tile):
            torch.mul(quants[p:p + tile], scale, out=diff).add_(the_min).sub_(self.x[p:p + tile])
            if self.use_mad:
                diff.abs_()
            else:
                diff.mul_(diff)
            diff.mul_(self.w[p:p + tile])
            for d in diff:
                err.add_(d)
        return err


def search_qkx2(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                scratch: Scratch, use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants`` on (npos, ngroups) position-major x and weights (npos: 32 for q4_k/q5_k,
    16 for q2_k). ``use_mad`` scores each candidate by the weighted absolute error instead of the squared
    one (ggml's ``diff = use_mad ? fabsf(diff) : diff*diff``); the rest of the search is the same.

    Returns (scale, the_min, L): fp32 (ngroups,), fp32 (ngroups,), and the quants as fp32 (npos, ngroups)
    (a scratch buffer).
    """
    st = _Qkx2Search(x, weights, nmax, use_mad, scratch)
    numerators = f32(_qkx2_numerators(nmax, rmin, rdelta, nstep), x.device)
    the_min = st.lo
    iscale = divide(float(nmax), st.hi - the_min)
    scale = divide(1.0, iscale)
    best_error = st.error(scale, the_min, st.quantize(iscale, the_min))
    # the running state; best_iscale/best_offset rebuild the kept quants at the end
    state = torch.stack([best_error, scale, iscale, the_min, the_min])

    for step in range(nstep + 1):
        best_error, the_min = state[0], state[4]
        iscale = torch.div(numerators[step], st.hi - the_min)
        quants = st.quantize(iscale, the_min)
        sum_l, sum_l2, sum_xl = st.sums(quants)
        det = st.sum_w * sum_l2 - sum_l * sum_l
        this_scale = (st.sum_w * sum_xl - st.sum_x * sum_l) / det
        this_min = (sum_l2 * st.sum_x - sum_l * sum_xl) / det
        min_positive = lane_mask(this_min > 0)
        this_scale = select(min_positive, sum_xl / sum_l2, this_scale)
        this_min.clamp_(max=0.0)                                  # NaN stays NaN, as ggml's `> 0` test
        cur_error = st.error(this_scale, this_min, quants)
        better = lane_mask((det > 0) & (cur_error < best_error))
        state = select(better, torch.stack([cur_error, this_scale, iscale, the_min, this_min]), state)

    _, scale, best_iscale, best_offset, the_min = state
    quants = st.quantize(best_iscale, best_offset).mul_(st.kept)
    scale = torch.where(st.flat, 0.0, scale)
    the_min = torch.where(st.flat, st.lo, the_min)
    return scale, -the_min, quants


# ----------------------------------------------------------------------------------------------------
# make_qx_quants: q6_k (nmax 32, rmse_type 1: weights x*x), 16-weight groups, 19 candidate scales
#
# The candidates are independent (only the final choice is sequential), so all 19 are evaluated at
# once on a (candidate, group) axis.

_QX_STEPS = [s for s in range(-9, 10) if s != 0]


def _qx_numerators(nmax: int) -> np.ndarray:
    """fp32 ``-nmax`` (first try) then ``-(nmax + 0.1f*is)`` for is = -9..9 without 0, in ggml's order."""
    is_ = np.array(_QX_STEPS, dtype=np.float32)
    return np.concatenate([[np.float32(-nmax)], -(np.float32(nmax) + np.float32(0.1) * is_)]).astype(np.float32)


def search_qx(x: torch.Tensor, nmax: int, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on (n, ngroups) position-major x.

    Returns (scale (ngroups,), L as fp32 (n, ngroups) in 0..2*nmax-1, 0 for an all-zero group).
    """
    npos, ngroups = x.shape
    vmax, amax = first_absmax(x, dim=0, work=scratch.take(npos, ngroups))
    live = amax >= GROUP_MAX_EPS
    iscales = f32(_qx_numerators(nmax), x.device)[:, None] / torch.where(live, vmax, 1.0)
    w = torch.mul(x, x, out=scratch.take(npos, ngroups))
    wx = torch.mul(w, x, out=scratch.take(npos, ngroups))
    sumlx = torch.zeros_like(iscales)
    suml2 = torch.zeros_like(iscales)
    quant = scratch.take(*iscales.shape)
    term = scratch.take(*iscales.shape)
    for i in range(npos):
        # |iscale*x| <= nmax + 0.9 for live groups: torch.round is nearest_int here
        torch.mul(iscales, x[i], out=quant)
        quant.round_().clamp_(-float(nmax), float(nmax - 1))
        sumlx.add_(torch.mul(quant, wx[i], out=term))            # (w*x)*l
        torch.mul(quant, w[i], out=term)
        suml2.add_(term.mul_(quant))                              # (w*l)*l

    # ggml keeps the first try unless a later one has suml2 > 0 and sumlx^2 > best*suml2, where best
    # (= scale*sumlx) follows the accepted tries: a running test, replayed in order.
    ratio = sumlx / suml2
    ratio[0] = torch.where(suml2[0] != 0, ratio[0], 0.0)          # scale = suml2 ? sumlx/suml2 : 0
    candidate_best = ratio * sumlx
    squares = sumlx * sumlx
    best = candidate_best[0]
    winner = torch.zeros(ngroups, dtype=torch.int32, device=x.device)
    for c in range(1, iscales.shape[0]):
        better = lane_mask((suml2[c] > 0) & (squares[c] > best * suml2[c]))
        best = select(better, candidate_best[c], best)
        winner = select(better, torch.full_like(winner, c), winner)
    winner = winner.long()[None]
    quants = torch.mul(x, iscales.gather(0, winner), out=scratch.take(npos, ngroups))
    quants.round_().clamp_(-float(nmax), float(nmax - 1)).add_(float(nmax)).mul_(live.float())
    return torch.where(live, ratio.gather(0, winner)[0], 0.0), quants


# ----------------------------------------------------------------------------------------------------
# make_q3_quants(do_rmse): q3_k (nmax 4), 16-weight groups, greedy coordinate descent on the quants

_Q3_TRIES = 5


def search_q3(x_groups: torch.Tensor, nmax: int, scratch: Scratch, chunk_groups: int,
              descent_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every group of x_groups (ngroups, n).

    Returns (scale (ngroups,), L as uint8 (n, ngroups) position-major, in 0..2*nmax-1, 0 for an
    all-zero group). The start of the search runs ``chunk_groups`` at a time; the few groups that go on
    to the greedy passes are then searched together, up to ``descent_groups`` at a time, so their many
    short rounds are paid for many chunks at once.
    """
    ngroups, npos = x_groups.shape
    quants = torch.empty((npos, ngroups), dtype=torch.uint8, device=x_groups.device)   # l + nmax
    sumlx = torch.empty(ngroups, device=x_groups.device)
    suml2 = torch.empty_like(sumlx)
    live = torch.empty(ngroups, dtype=torch.bool, device=x_groups.device)
    movable = torch.empty_like(live)
    for start in range(0, ngroups, chunk_groups):
        cols = slice(start, start + chunk_groups)
        with scratch.region():
            x = scratch.take(npos, x_groups[cols].shape[0]).copy_(x_groups[cols].t())
            q, sumlx[cols], suml2[cols], live[cols], movable[cols] = _q3_start(x, nmax, scratch)
            quants[:, cols] = q.add_(float(nmax))
    descent = _Q3Descent(x_groups, quants, sumlx, suml2, nmax, scratch)
    for batch in torch.nonzero(live & movable).squeeze(1).split(descent_groups):
        with scratch.region():
            descent.run(batch)
    scale = torch.where(live & (suml2 > 0), sumlx / suml2, 0.0)
    quants.mul_(live.to(torch.uint8))
    return scale, quants


def _q3_start(x: torch.Tensor, nmax: int, scratch: Scratch):
    """The first quants and sums of make_q3_quants on (n, ngroups) position-major x, and which groups the
    greedy passes can change at all. Returns (L fp32 in -nmax..nmax-1, sumlx, suml2, live, movable)."""
    npos, ngroups = x.shape

    def buf() -> torch.Tensor:
        return scratch.take(npos, ngroups)

    vmax, amax = first_absmax(x, dim=0, work=buf())
    live = amax >= GROUP_MAX_EPS
    iscale = divide(-float(nmax), torch.where(live, vmax, 1.0))
    # |iscale*x| <= nmax: torch.round is nearest_int here
    quants = torch.mul(x, iscale, out=buf()).round_().clamp_(-float(nmax), float(nmax - 1))
    w = torch.mul(x, x, out=buf())
    wx = torch.mul(w, x, out=buf())
    wxl = torch.mul(wx, quants, out=buf())                         # (w*x)*l
    wll = torch.mul(w, quants, out=buf()).mul_(quants)             # (w*l)*l
    sumlx = sequential_sum(wxl, start_at_zero=True)
    suml2 = sequential_sum(wll, start_at_zero=True)

    # A pass without an accepted move ends ggml's search, and a move needs slx > 0 and a quant that
    # changes: most groups have no such position at all and are done after this screening.
    cand_slx = torch.sub(sumlx, wxl, out=buf())
    new_q = nearest_int_(torch.sub(suml2, wll, out=buf()).mul_(x).div_(cand_slx))  # (x*sl2)/slx
    new_q = buf().copy_(new_q.clamp_(-nmax, nmax - 1))
    changed = torch.ne(new_q, quants, out=buf())
    changed.mul_(torch.gt(cand_slx, 0.0, out=buf()))
    return quants, sumlx, suml2, live, torch.amax(changed, dim=0) > 0


class _Q3Descent:
    """ggml's up-to-5 passes of single-quant moves, on the groups that can move at all.

    A group's state (quants, sumlx, suml2) changes only when a move is accepted, so each round tests
    every remaining position of the current pass against the current state at once and applies only the
    first accepted move: positions before it were rejected against this very state, exactly as in the
    sequential loop. Groups leave the active set (compacted by index) when their passes end.
    Per-position arrays are (16, nactive) scratch buffers, compacted in place.
    """

    def __init__(self, x_groups, quants, sumlx, suml2, nmax: int, scratch: Scratch):
        self.x_groups = x_groups                      # (ngroups, n) fp32
        self.quants = quants                          # (n, ngroups) uint8, l + nmax
        self.sumlx, self.suml2 = sumlx, suml2
        self.nmax = nmax
        self.scratch = scratch
        self.npos = x_groups.shape[1]
        self.positions = torch.arange(self.npos, device=x_groups.device, dtype=torch.float32)[:, None]
        self.rank = self.npos - self.positions

    def _take(self, ncols: int) -> torch.Tensor:
        return self.scratch.take(self.npos, ncols)

    @staticmethod
    def _compact(arrays: dict, cols: torch.Tensor, tmp: torch.Tensor) -> dict:
        """Columns ``cols`` of every per-position array, kept at the start of its own buffer."""
        npos, n = tmp.shape[0], cols.numel()
        tmp = tmp.view(-1)[:npos * n].view(npos, n)
        return {name: a.view(-1)[:npos * n].view(npos, n).copy_(torch.index_select(a, 1, cols, out=tmp))
                for name, a in arrays.items()}

    def _start(self, idx: torch.Tensor) -> dict:
        """The per-position arrays of groups ``idx``: x, the quants l and the terms (w*x)*l, (w*l)*l."""
        n = idx.numel()
        x = self._take(n).copy_(self.x_groups.index_select(0, idx).t())
        q = self._take(n).copy_(self.quants.index_select(1, idx)).sub_(float(self.nmax))
        w = torch.mul(x, x, out=self._take(n))
        wxl = torch.mul(w, x, out=self._take(n)).mul_(q)
        return {"x": x, "q": q, "wxl": wxl, "wll": w.mul_(q).mul_(q)}

    def _finish(self, a: dict, idx, slx, sl2, done: torch.Tensor) -> None:
        cols = idx.index_select(0, done)
        self.quants.index_copy_(1, cols, a["q"].index_select(1, done).add_(float(self.nmax)).to(torch.uint8))
        self.sumlx.index_copy_(0, cols, slx.index_select(0, done))
        self.suml2.index_copy_(0, cols, sl2.index_select(0, done))

    def run(self, idx: torch.Tensor) -> None:
        """Search the groups ``idx`` to the end and write their quants and sums back."""
        npos = self.npos
        a = self._start(idx)
        tmp = self._take(idx.numel())
        slx, sl2 = self.sumlx[idx], self.suml2[idx]
        start = torch.zeros_like(idx)                      # first position left in the current pass
        passes = torch.zeros_like(idx)                     # completed passes
        moved = torch.zeros_like(idx, dtype=torch.bool)    # a move was accepted in the current pass
        searching = torch.ones_like(idx, dtype=torch.bool)
        while idx.numel():
            with self.scratch.region():
                first = self._first_move(a, slx, sl2, start)
            has_move = first < npos
            pass_over = ~has_move | (first == npos - 1)
            finished = searching & ((pass_over & ~(moved | has_move))   # a pass without moves ends it
                                    | (pass_over & (passes == _Q3_TRIES - 1)))
            passes += pass_over.long()
            moved = (moved | has_move) & ~pass_over
            start = torch.where(pass_over, 0, first + 1)
            if bool(finished.any()):
                self._finish(a, idx, slx, sl2, torch.nonzero(finished).squeeze(1))
                searching &= ~finished
                if int(searching.sum()) <= 0.75 * idx.numel():   # compact once a quarter is done
                    keep = torch.nonzero(searching).squeeze(1)
                    a = self._compact(a, keep, tmp)
                    idx, slx, sl2, start, passes, moved, searching = (
                        t.index_select(0, keep) for t in (idx, slx, sl2, start, passes, moved, searching))
            start.masked_fill_(~searching, npos)           # done groups wait, masked, for compaction

    def _first_move(self, a: dict, slx: torch.Tensor, sl2: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """One round: the first accepted move of every group at or after ``start``, applied in place to
        the per-position arrays and to slx/sl2; returns its position (npos where there is none).

        A move needs slx > 0 and a new quant: those cheap conditions are evaluated everywhere, the full
        acceptance test only at each group's first such candidate (and its next one if that is
        rejected, which is rare).
        """
        npos, nmax, n = self.npos, self.nmax, slx.numel()
        cand_slx = torch.sub(slx, a["wxl"], out=self._take(n))
        ratio = torch.sub(sl2, a["wll"], out=self._take(n)).mul_(a["x"]).div_(cand_slx)   # (x*sl2)/slx
        new_q = self._take(n).copy_(nearest_int_(ratio).clamp_(-nmax, nmax - 1))
        mask = self._take(n)
        key = torch.ne(new_q, a["q"], out=self._take(n)).mul_(torch.gt(cand_slx, 0.0, out=mask))
        # key = npos - position at the candidates at or after start, 0 elsewhere: amax finds the first
        key.mul_(torch.ge(self.positions, start, out=mask)).mul_(self.rank)
        first = torch.full((n,), npos, dtype=torch.long, device=slx.device)
        todo = torch.arange(n, device=slx.device)
        top = torch.amax(key, dim=0)
        while todo.numel():
            has = top > 0
            todo, pos = todo[has], npos - top[has].long()
            at = pos * n + todo
            q = new_q.view(-1)[at]
            x = a["x"].view(-1)[at]
            w = x * x
            wxl = w * x * q                                            # (w*x)*new_l
            wll = w * q * q                                            # (w*new_l)*new_l
            cur_slx, cur_sl2 = slx[todo], sl2[todo]
            new_slx = cand_slx.view(-1)[at] + wxl
            new_sl2 = (cur_sl2 - a["wll"].view(-1)[at]) + wll
            ok = (new_sl2 > 0) & (new_slx * new_slx * cur_sl2 > (cur_slx * cur_slx) * new_sl2)
            wpos, wgrp = pos[ok], todo[ok]
            for name, value in (("q", q), ("wxl", wxl), ("wll", wll)):
                a[name][wpos, wgrp] = value[ok]
            slx[wgrp] = new_slx[ok]
            sl2[wgrp] = new_sl2[ok]
            first[wgrp] = wpos
            key.view(-1)[at[~ok]] = 0.0                               # rejected: try the next candidate
            todo = todo[~ok]
            top = torch.amax(key.index_select(1, todo), dim=0)
        return first
