"""Inter-layer scheduler (ILS): which units are frozen at each optimizer step.

Pure bookkeeping over unit indices; it never touches tensors of the model. The caller
reports a fresh score for every unit that trained, and asks for the next frozen set.
"""

from __future__ import annotations

import torch

# Initial scores are drawn from [INITIAL_SCORE, 2 * INITIAL_SCORE): far above any real
# relative update, so that every unit is visited (in a seeded random order) before the
# measured scores take over.
INITIAL_SCORE = 1.0e6


class InterLayerScheduler:
    """Chooses ``n_frozen`` units per step by policy.

    ``ils``: freeze the units with the lowest score (stable order on ties). Only units that
    trained get a fresh score; frozen units keep their stale one, so a frozen unit comes
    back once the trained units' fresh scores fall below it.
    ``random``: a fresh uniform random frozen set each step. ``none``: nothing frozen.

    ``explore`` (ILS only): this fraction of the trained slots goes to units drawn at random
    from those the scores would freeze; the rest go to the highest scores as usual.
    """

    def __init__(
        self,
        n_units: int,
        freeze_ratio: float,
        policy: str,
        seed: int,
        warmup_steps: int = 0,
        score: str = "relative",
        max_stale_steps: int | None = None,
        explore: float = 0.0,
    ):
        self.n_units = n_units
        self.policy = policy
        self.n_frozen = 0 if policy == "none" else int(freeze_ratio * n_units)
        self.warmup_steps = warmup_steps
        self.score_mode = score
        self.max_stale_steps = max_stale_steps
        if explore and max_stale_steps is not None:
            raise ValueError("explore and max_stale_steps cannot be combined; set one of them.")
        n_train = n_units - self.n_frozen
        self.n_explore = min(n_train, round(explore * n_train)) if policy == "ils" else 0
        self.generator = torch.Generator().manual_seed(seed)
        self.scores = INITIAL_SCORE * (
            1.0 + torch.rand(n_units, generator=self.generator, dtype=torch.float64)
        )
        # First measured score of each unit (NaN until measured): the "normalized" score
        # divides by it, so units compete on how much their own update rate has changed
        # rather than on weight magnitude (AdamW's relative update is mostly lr / |W|).
        self.first_scores = torch.full((n_units,), float("nan"), dtype=torch.float64)
        self.last_trained = torch.full((n_units,), -1, dtype=torch.long)
        self.step = 0
        self.frozen = self._choose()

    def _choose(self) -> torch.Tensor:
        """Boolean mask of the units frozen for the coming step."""
        mask = torch.zeros(self.n_units, dtype=torch.bool)
        if self.n_frozen == 0 or self.step < self.warmup_steps:
            return mask
        if self.policy == "random":
            idx = torch.randperm(self.n_units, generator=self.generator)[: self.n_frozen]
            mask[idx] = True
            return mask
        order = torch.sort(self.scores, stable=True).indices
        if self.max_stale_steps is not None:
            # Units frozen for max_stale_steps or more are due: they train first (the
            # longest-waiting first), so a stale low score cannot starve a unit forever.
            stale = self.step - 1 - self.last_trained
            due = torch.nonzero(stale >= self.max_stale_steps).flatten()
            due = due[torch.sort(-stale[due], stable=True).indices][: self.n_units - self.n_frozen]
            if len(due):
                keep = torch.ones(self.n_units, dtype=torch.bool)
                keep[due] = False
                order = order[keep[order]]
        if self.n_explore:
            # the top scores keep their slots; the other trained slots are drawn at random
            # from the rest (the units the scores alone would freeze)
            n_top = self.n_units - self.n_frozen - self.n_explore
            rest = order[: self.n_units - n_top]
            drawn = torch.randperm(len(rest), generator=self.generator)[: self.n_explore]
            keep = torch.ones(len(rest), dtype=torch.bool)
            keep[drawn] = False
            mask[rest[keep]] = True
            return mask
        mask[order[: self.n_frozen]] = True
        return mask

    def advance(
        self,
        trained: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        scored: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Record the units that trained in this step and fresh scores, and move on.

        ``trained``: indices of the units that trained in this step. ``scores``: fresh
        scores of the units ``scored`` (same length; default ``trained``: this step's own
        scores; with ``async_scores`` an earlier step's units). Returns the frozen mask for
        the next step.
        """
        if trained is not None and len(trained):
            self.last_trained[trained] = self.step
        scored = trained if scored is None else scored
        if scores is not None and scored is not None and len(scored):
            scores = scores.to(torch.float64)
            if self.score_mode == "normalized":
                first = self.first_scores[scored]
                first = torch.where(torch.isnan(first), scores, first)
                self.first_scores[scored] = first
                scores = scores / first.clamp_min(1e-30)
            self.scores[scored] = scores
        self.step += 1
        self.frozen = self._choose()
        return self.frozen

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "scores": self.scores.clone(),
            "first_scores": self.first_scores.clone(),
            "last_trained": self.last_trained.clone(),
            "frozen": self.frozen.clone(),
            "rng_state": self.generator.get_state(),
            "n_units": self.n_units,
            "policy": self.policy,
            "n_frozen": self.n_frozen,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["n_units"] != self.n_units:
            raise ValueError(
                f"the scheduler state holds {state['n_units']} units but this model has "
                f"{self.n_units}; load it into the same model and configuration it was saved from."
            )
        self.step = int(state["step"])
        self.scores = state["scores"].clone().to(torch.float64)
        self.first_scores = state["first_scores"].clone().to(torch.float64)
        self.last_trained = state["last_trained"].clone().to(torch.long)
        self.frozen = state["frozen"].clone().to(torch.bool)
        self.generator.set_state(state["rng_state"])
