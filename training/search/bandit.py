"""Search strategies for MMS: random, ε-greedy, UCB and Thompson sampling.

All four share one bookkeeping. Per category option (e.g. merge type): a count, a reward sum
and a Beta(α, β) updated with α += r, β += 1 − r for a reward r in [0, 1] (the Beta-Bernoulli
update with a fractional outcome, as in the UniGuard paper's Thompson sampling).

Per weight dimension, a Beta(α_i, β_i) whose mean estimates "giving model i more weight
helps". A trial credits each dimension by how far its weight was from uniform
(d_i = k·w_i − 1): above uniform, α_i += r·d_i and β_i += (1 − r)·d_i; below uniform the
evidence points the other way, α_i += (1 − r)·|d_i| and β_i += r·|d_i|. Crediting every
dimension with its plain weight instead (α_i += r·k·w_i) was tried first: every trial then
adds about one pseudo-count to every dimension, the posteriors all tighten around the mean
reward, the proposals collapse to uniform weights and the search stops learning which model
matters. Thompson sampling turns a sample θ_i into weights through its odds θ/(1 − θ),
so θ = 0.5 everywhere is the uniform soup and a confident θ_i = 0.8 gives model i four
times the weight of an uninformative one.

Reward shaping: merged guardrails of one family score within a few F1 points of each other,
so raw F1 (≈0.9 for every trial) moves every posterior alike. By default a trial's reward
is therefore its mid-rank among all trials so far (0 = worst, 1 = best, 0.5 for the first);
``reward="raw"`` uses F1 itself, as the paper states it.

Proposals are drawn from a generator seeded by (seed, strategy, iteration), so a resumed
search that replays the same history proposes exactly what the uninterrupted one would.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np

from training.search.space import Proposal, SearchSpace

Reward = Literal["rank", "raw"]


class Strategy(ABC):
    name: ClassVar[str]

    def __init__(self, space: SearchSpace, *, seed: int = 0, reward: Reward = "rank") -> None:
        if reward not in ("rank", "raw"):
            raise ValueError(f"reward must be 'rank' or 'raw', got {reward!r}")
        self.space = space
        self.seed = seed
        self.reward_mode = reward
        k = space.n_weights
        self.raw_rewards: list[float] = []
        self.history: list[tuple[Proposal, float]] = []
        self.best: tuple[Proposal, float] | None = None
        self.cat_n = {c: dict.fromkeys(opts, 0.0) for c, opts in space.categories.items()}
        self.cat_sum = {c: dict.fromkeys(opts, 0.0) for c, opts in space.categories.items()}
        self.cat_alpha = {c: dict.fromkeys(opts, 1.0) for c, opts in space.categories.items()}
        self.cat_beta = {c: dict.fromkeys(opts, 1.0) for c, opts in space.categories.items()}
        self.w_n = np.zeros(k)  # evidence per weight dimension (Σ |k·w_i − 1|)
        self.w_alpha = np.ones(k)
        self.w_beta = np.ones(k)

    # -- proposals ---------------------------------------------------------------------------
    def rng(self, iteration: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), iteration])

    def propose(self, iteration: int) -> Proposal:
        return self.space.check(self._propose(self.rng(iteration), iteration))

    @abstractmethod
    def _propose(self, rng: np.random.Generator, iteration: int) -> Proposal: ...

    def random_proposal(self, rng: np.random.Generator) -> Proposal:
        """Dirichlet(1) weights (uniform on the simplex) and uniform options."""
        return Proposal(
            self.space.normalise(rng.dirichlet(np.ones(self.space.n_weights))), self.space.uniform_choices(rng)
        )

    # -- learning ----------------------------------------------------------------------------
    def shape(self, reward: float) -> float:
        if self.reward_mode == "raw":
            return float(min(1.0, max(0.0, reward)))
        r = np.asarray(self.raw_rewards)
        return float(((r < reward).sum() + 0.5 * (r == reward).sum()) / len(r))

    def observe(self, proposal: Proposal, reward: float) -> float:
        """Record one evaluated proposal; returns the shaped reward the statistics received."""
        self.space.check(proposal)
        self.raw_rewards.append(float(reward))
        self.history.append((proposal, float(reward)))
        if self.best is None or reward > self.best[1]:
            self.best = (proposal, float(reward))
        r = self.shape(float(reward))
        for c, o in proposal.choices.items():
            self.cat_n[c][o] += 1.0
            self.cat_sum[c][o] += r
            self.cat_alpha[c][o] += r
            self.cat_beta[c][o] += 1.0 - r
        d = self.space.n_weights * np.asarray(proposal.weights, dtype=float) - 1.0
        up, down = np.clip(d, 0.0, None), np.clip(-d, 0.0, None)
        self.w_alpha += r * up + (1.0 - r) * down
        self.w_beta += (1.0 - r) * up + r * down
        self.w_n += np.abs(d)
        return r

    # -- helpers -----------------------------------------------------------------------------
    def cat_mean(self, category: str) -> dict[str, float]:
        return {o: (self.cat_sum[category][o] / n if n else math.inf) for o, n in self.cat_n[category].items()}

    @staticmethod
    def argmax(scores: dict[str, float], rng: np.random.Generator) -> str:
        top = max(scores.values())
        options = [o for o, v in scores.items() if v == top]
        return options[int(rng.integers(len(options)))]

    def posterior_mean(self, category: str | None = None) -> dict[str, float] | np.ndarray:
        """Beta posterior means: per option of ``category``, or per weight dimension when None."""
        if category is None:
            return self.w_alpha / (self.w_alpha + self.w_beta)
        return {
            o: self.cat_alpha[category][o] / (self.cat_alpha[category][o] + self.cat_beta[category][o])
            for o in self.space.categories[category]
        }


class RandomSearch(Strategy):
    """Baseline: Dirichlet(1) weights and a uniform type every time; learns nothing."""

    name = "random"

    def _propose(self, rng: np.random.Generator, iteration: int) -> Proposal:
        return self.random_proposal(rng)


class EpsilonGreedy(Strategy):
    """With probability ε a random proposal; otherwise the best-mean option per category and
    weights drawn tightly around the best trial's weights (Dirichlet with concentration κ per model)."""

    name = "egreedy"

    def __init__(self, space: SearchSpace, *, epsilon: float = 0.2, concentration: float = 30.0, **kw) -> None:
        super().__init__(space, **kw)
        self.epsilon = epsilon
        self.concentration = concentration

    def _propose(self, rng: np.random.Generator, iteration: int) -> Proposal:
        explore = rng.random() < self.epsilon
        if self.best is None or explore:
            return self.random_proposal(rng)
        choices = {c: self.argmax(self.cat_mean(c), rng) for c in self.space.categories}
        k = self.space.n_weights
        centre = np.asarray(self.best[0].weights)
        weights = rng.dirichlet(self.concentration * k * centre + 0.05) if k > 1 else np.ones(1)
        return Proposal(self.space.normalise(weights), choices)


class UCB(Strategy):
    """UCB1 per category (mean + c·sqrt(2 ln N / n), untried options first). For weights, an
    optimistic index per dimension (posterior mean + c·sqrt(2 ln N / (1 + evidence))) sets a
    centre softmax(index / τ); proposals are drawn tightly around it (Dirichlet, concentration
    κ per model) so that consecutive trials stay distinct."""

    name = "ucb"

    def __init__(
        self, space: SearchSpace, *, c: float = 0.5, temperature: float = 0.1, concentration: float = 30.0, **kw
    ) -> None:
        super().__init__(space, **kw)
        self.c = c
        self.temperature = temperature
        self.concentration = concentration

    def _propose(self, rng: np.random.Generator, iteration: int) -> Proposal:
        log_n = 2.0 * math.log(max(float(len(self.history)), 1.0))
        choices = {}
        for c, opts in self.space.categories.items():
            index = {}
            for o in opts:
                n = self.cat_n[c][o]
                index[o] = math.inf if n == 0 else self.cat_sum[c][o] / n + self.c * math.sqrt(log_n / n)
            choices[c] = self.argmax(index, rng)
        k = self.space.n_weights
        if k == 1:
            return Proposal((1.0,), choices)
        index_w = np.asarray(self.posterior_mean()) + self.c * np.sqrt(log_n / (1.0 + self.w_n))
        centre = np.exp((index_w - index_w.max()) / self.temperature)
        centre = centre / centre.sum()
        return Proposal(self.space.normalise(rng.dirichlet(self.concentration * k * centre + 0.05)), choices)


class ThompsonSampling(Strategy):
    """Beta(α, β) per weight dimension and per category option (UniGuard's MMS): sample θ_i per
    model, weights ∝ θ_i / (1 − θ_i); sample every option's Beta and take the argmax."""

    name = "thompson"

    def _propose(self, rng: np.random.Generator, iteration: int) -> Proposal:
        theta = np.clip(rng.beta(self.w_alpha, self.w_beta), 1e-6, 1.0 - 1e-3)
        choices = {}
        for c, opts in self.space.categories.items():
            samples = {o: float(rng.beta(self.cat_alpha[c][o], self.cat_beta[c][o])) for o in opts}
            choices[c] = self.argmax(samples, rng)
        return Proposal(self.space.normalise(theta / (1.0 - theta)), choices)


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (RandomSearch, EpsilonGreedy, UCB, ThompsonSampling)}


def make_strategy(name: str, space: SearchSpace, **kw) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown search strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
    return cls(space, **kw)
