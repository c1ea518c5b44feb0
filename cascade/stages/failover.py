"""Which model of a tier a job's requests go to: the first that is up, a probe of one that was down, or none.

A tier is its model and its ``fallbacks``, in order (``ResolvedTier.chain``). At claim time one health read
per tier and message (``cascade.health``) says which are up; the job goes to the first one up, unless a
model before it finished its cooldown and this message was given its probe: then the first job of the
message probes it. A request that then fails with a provider fault goes on to the next model that was up
(``Pick.backups``). When every model of the tier is down the job waits in Postgres (``on_outage: wait``),
or escalates as ``model_error:unavailable`` (``on_outage: escalate``, or after ``outage_wait_s`` down).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cascade.config import ModelConfig, ResolvedTier
from cascade.health import ModelState
from cascade.stages.context import StageContext

__all__ = ["Pick", "Picker", "outage_note"]

#: A job waiting out an outage comes back at least this soon, at most this late.
MIN_OUTAGE_WAIT_S, MAX_OUTAGE_WAIT_S = 1.0, 30.0


@dataclass
class Pick:
    """Where a job's requests go: ``tier`` with the model to call (None: every model of the tier is down)."""

    tier: ResolvedTier | None
    #: the job's requests are the model's probe after its cooldown: their outcome closes or reopens it
    probe: bool = False
    #: the models after the chosen one that were up, in order: where a failed request goes next
    backups: list[ModelConfig] = field(default_factory=list)
    #: every model down: seconds until the first cooldown ends, and since the most recent one went down
    wait_s: float = 0.0
    down_for_s: float = 0.0
    down: list[str] = field(default_factory=list)

    def next_after(self, model: ModelConfig) -> ModelConfig | None:
        """The backup after ``model`` (the chosen one or a backup already tried)."""
        names = [m.name for m in self.backups]
        start = names.index(model.name) + 1 if model.name in names else 0
        return self.backups[start] if start < len(self.backups) else None


class Picker:
    """Picks for the jobs of one message: one health read per distinct tier chain."""

    def __init__(self, ctx: StageContext) -> None:
        self._ctx = ctx
        self._states: dict[tuple[str, ...], list[ModelState]] = {}
        self._probed: set[tuple[str, ...]] = set()

    def pick(self, tier: ResolvedTier) -> Pick:
        chain = tier.chain
        names = tuple(m.name for m in chain)
        states = self._states.get(names)
        if states is None:
            lease = max(m.timeout_s for m in chain) + 5.0
            states = self._states[names] = self._ctx.health().states(list(names), probe_lease_s=lease)
        for i, (model, state) in enumerate(zip(chain, states, strict=True)):
            probe = state.probe and names not in self._probed
            if probe or state.up:
                if probe:
                    self._probed.add(names)
                backups = [m for m, s in zip(chain[i + 1:], states[i + 1:], strict=True) if s.up]
                return Pick(tier.using(model), probe=probe, backups=backups)
        return Pick(None, wait_s=min(MAX_OUTAGE_WAIT_S, max(MIN_OUTAGE_WAIT_S, min(s.cooldown_left_s for s in states))),
                    down_for_s=min(s.down_for_s for s in states), down=list(names))


def outage_note(tier: ResolvedTier, pick: Pick) -> str:
    return (f"every model of tier {tier.index} is down ({', '.join(pick.down)}), for {pick.down_for_s:.0f} s; "
            f"trying again in {pick.wait_s:.0f} s")
