"""Per-sample cache decisions for batched calls (`CacheConfig(per_sample=True)`).

By default a stack decides once per transformer call for the whole batch (as cache-dit and
diffusers do): with a list of prompts or `num_images_per_prompt > 1`, one sample's change decides
for all, so a batch gives other images than its prompts run one by one. In per-sample mode every
row of the batch has its own `CallState` (its own limits, policy memory and residuals), decided by
the same policy code on that row's slice of the probe. Rows that skip take their residual (or its
forecast); only the rows that must compute run the cacheable blocks: the blocks' batched inputs are
`index_select`ed to those rows, and their outputs are scattered back. Under batched CFG in one call
the branches are rows too, so each sample of each branch decides alone.

Which inputs are batched: tensors (also inside tuples, lists and dicts) whose first dim is the
batch size, as CFG parallelism splits them. A non-batched tensor whose first dim equals the batch
size by chance (e.g. a rotary table with as many positions as samples) would be sliced wrongly. A
text stream of one row broadcast over the batch (FLUX's unconditional call with one negative prompt)
stays whole for the computing rows and is expanded where their outputs are scattered back.

Under parallelism each row's statistic is reduced over the ranks on its own, as a (1, 2) row (CFG
parallelism's batched-call average applies to batch-level statistics only: the two halves hold
different samples), so every rank of a context- or tensor-parallel group selects the same rows and
the collectives inside the blocks stay matched. Cost: one reduction and one host read per sample
and step, instead of one per step.
"""

from __future__ import annotations

import torch

from .._diffusers_compat import BaseState
from .state import CallState


class PerSampleState(BaseState):
    """One context's per-call state in per-sample mode: a `CallState` per row of the batch."""

    def __init__(self, config=None, threshold: float = 0.0) -> None:
        self.config, self.threshold = config, threshold
        self.samples: list[CallState] = []
        self.block0: tuple | None = None
        self.rows: list[int] = []  # this step's rows that compute the cacheable blocks
        self.index: torch.Tensor | None = None  # the same rows as a tensor (None: all of them)

    def reset(self) -> None:
        self.__init__(self.config, self.threshold)

    def report(self) -> dict:
        """Per-sample reports, and the steps every sample cached (the steps whose blocks nobody ran)."""
        reports = [s.report() for s in self.samples]
        everyone = sorted(set.intersection(*(set(r["cached_steps"]) for r in reports))) if reports else []
        return {"steps": reports[0]["steps"] if reports else 0, "cached_steps": everyone,
                "residual_diffs": {}, "pruned_blocks": {},
                "blocks_computed": sum(r["blocks_computed"] for r in reports),
                "blocks_total": sum(r["blocks_total"] for r in reports), "samples": reports}


class SampleView:
    """The stack's cache as one sample's policy sees it: the same config, limits and bookkeeping, with
    statistics reduced as per-sample rows."""

    def __init__(self, cache) -> None:
        self.cache = cache

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def relative_l1(self, prev: torch.Tensor, cur: torch.Tensor) -> float:
        stats = torch.stack([(prev.float() - cur.float()).abs().mean(), prev.float().abs().mean()]).unsqueeze(0)
        if self.cache.reduce is not None:
            stats = self.cache.reduce(stats)
        return (stats[0, 0] / stats[0, 1]).item()

    # StackCache's own logic, run with this view as `self` (so `similar` uses the row statistic).
    def similar(self, st, prev, cur):
        return type(self.cache).similar(self, st, prev, cur)

    def allowed(self, st):
        return type(self.cache).allowed(self, st)

    def in_warmup(self, st):
        return type(self.cache).in_warmup(self, st)


def _take(value, index: torch.Tensor, batch: int):
    """`value` with its batched tensors restricted to the rows in `index`."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_take(v, index, batch) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, index, batch) for k, v in value.items()}
    return value


def _rows(t: torch.Tensor | None, s: int) -> torch.Tensor | None:
    return t[s:s + 1] if t is not None and t.dim() > 0 and t.shape[0] > s else t


def run_block(cache, index: int, forward, module, args, kwargs):
    """StackCache.run_block in per-sample mode (see the module docstring)."""
    pst: PerSampleState = cache.states.get_state()
    io = cache.io
    if index == 0:
        hidden = io.inputs(module, args, kwargs)[0]
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"CacheConfig.per_sample=True needs the blocks' {io.hidden_arg!r} to be one batched "
                            f"tensor; {type(module).__name__} gets {type(hidden).__name__}")
        if len(pst.samples) != hidden.shape[0]:  # a new call, or the batch size changed: fresh rows
            pst.samples = [CallState(pst.config, pst.threshold) for _ in range(hidden.shape[0])]
        for s, st in enumerate(pst.samples):
            cache.begin_step(st)
            st.hidden_in = hidden[s:s + 1]
        pst.block0 = (module, args, kwargs)
        pst.rows, pst.index = list(range(len(pst.samples))), None
    batch = len(pst.samples)
    middle = cache.first_middle <= index <= cache.last_middle
    if index == cache.first_middle and middle:
        hidden, encoder = io.inputs(module, args, kwargs)
        modulated = cache.modulated(pst.block0)
        view = SampleView(cache)
        for s, st in enumerate(pst.samples):
            st.middle_in = (hidden[s:s + 1], _rows(encoder, s))
            st.probe = cache.decide(st, *st.middle_in, _rows(modulated, s), view=view)
        pst.rows = [s for s, st in enumerate(pst.samples) if not st.skipping]
        pst.index = None if len(pst.rows) == batch else torch.tensor(pst.rows, dtype=torch.long, device=hidden.device)
    if not middle or pst.index is None:  # every row computes: the block's own call on the whole batch
        out = forward(*args, **kwargs)
    elif not pst.rows:  # every row skips
        out = io.pack(*io.inputs(module, args, kwargs))
    else:
        sub = forward(*_take(args, pst.index, batch), **_take(kwargs, pst.index, batch))
        hidden, encoder = io.inputs(module, args, kwargs)
        sub_hidden, sub_encoder = io.outputs(sub)
        hidden = hidden.index_copy(0, pst.index, sub_hidden)
        if encoder is not None and sub_encoder is not None:
            if encoder.shape[0] != batch:  # one text stream broadcast over the batch (e.g. FLUX's negative prompt)
                encoder = encoder.expand(batch, *encoder.shape[1:])
            encoder = encoder.index_copy(0, pst.index, sub_encoder)
        out = io.pack(hidden, encoder)
    for s in (pst.rows if middle else range(batch)):
        pst.samples[s].blocks_computed += 1
    if middle and index == cache.last_middle:
        out = _finish_middle(cache, pst, out)
    return out


def _finish_middle(cache, pst: PerSampleState, out):
    """After the last cacheable block: skipped rows add their residual, computed rows store theirs."""
    io = cache.io
    hidden, encoder = io.outputs(out)
    if len(pst.rows) < len(pst.samples):
        h_rows, e_rows = [], []
        for s, st in enumerate(pst.samples):
            h, e = hidden[s:s + 1], _rows(encoder, s)
            if st.skipping:
                h = h + st.hidden_residual.predict(st.step)
                if e is not None and io.return_encoder is not None and st.encoder_residual.last is not None:
                    e = e + st.encoder_residual.predict(st.step)
            h_rows.append(h)
            e_rows.append(e)
        hidden = torch.cat(h_rows)
        encoder = torch.cat(e_rows) if encoder is not None else None
        out = io.pack(hidden, encoder)
    view = SampleView(cache)
    for s in pst.rows:
        st = pst.samples[s]
        h = hidden[s:s + 1]
        st.hidden_residual.update(st.step, h - st.middle_in[0])
        if encoder is not None and st.middle_in[1] is not None and io.return_encoder is not None:
            st.encoder_residual.update(st.step, encoder[s:s + 1] - st.middle_in[1])
        cache.policy.computed(view, st, st.probe, h)
    return out
