"""`safe`: SAFE's generate -> verify -> ensemble cycle, with optional entropy gating.

1. The drafter (first member) proposes up to ``draft_len`` tokens.
2. Positions to check: all of them (faithful SAFE) or, with the gate on, only those where the drafter was
   unsure. A position is checkable only if its byte offset is a token boundary for every verifier
   (SAFE's "OOV-like" test). No checkable position -> the chunk is accepted and the verifiers stay behind.
3. Otherwise each verifier brings its cache up to the accepted text plus the draft in ONE decode call,
   with logits only at the checked positions (catch-up of lagging verifiers happens in that same call).
4. Walk the checked positions; at the first one that fails consensus, ensemble: the union of top-k
   candidates decides the token. A different token ends the cycle: the rest of the draft is dropped and
   the drafter's cache trimmed back to the accepted text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..alignment import reliable_view, token_ending_at
from ..decisions import EOG, Gate, consensus, filter_probs, speculative_accept_probability
from ..member import Lane
from ..options import Option
from .base import UNION_K, WEIGHTS, ContextFull, EvalConfig, Piece, Policy, PolicyStats, option
from .registry import register

DRAFT_LEN = Option("draft_len", int, 5, "Tokens drafted per chunk.", range=(1, 64))
GATE = Option("gate", float, 0.5, "Verify only where the drafter's top-1 probability is below this; off verifies "
              "every chunk (faithful SAFE).", range=(0.0, 1.0), off=True)
GATE_ENTROPY = Option("gate_entropy", float, None, "Also verify where the drafter's entropy exceeds this many nats.",
                      range=(0.0, 20.0), off=True)
SHARPEN = Option("sharpen", str, "prefix", "How the union distribution is sharpened: prefix (SAFE's prefix-mass "
                 "rule), geometric (geometric mean), none.", choices=("prefix", "geometric", "none"))
SHARPEN_LAMBDA = Option("sharpen_lambda", float, 0.1, "prefix sharpening: a candidate above this ensemble "
                        "probability takes the mass of the candidates that continue its text.", range=(0.0, 1.0))
# Batched verification and one-token drafting differ numerically, so exact near-ties can flip.
TIE_TOLERANCE = Option("tie_tolerance", float, 0.1, "A verifier agrees with a drafted token within this relative "
                       "margin of its own top probability; the drafted token also wins such near-ties in the union.",
                       range=(0.0, 1.0))


@dataclass(frozen=True)
class SafeOptions:
    """SAFE's options."""

    draft_len: int = option(DRAFT_LEN)
    gate: float | None = option(GATE)
    gate_entropy: float | None = option(GATE_ENTROPY)
    union_k: int = option(UNION_K)
    sharpen: str = option(SHARPEN)
    sharpen_lambda: float = option(SHARPEN_LAMBDA)
    tie_tolerance: float = option(TIE_TOLERANCE)
    weights: tuple[float, ...] | None = option(WEIGHTS)

    @property
    def gating(self) -> Gate:
        """The confidence gate from ``gate`` and ``gate_entropy`` (both None: faithful SAFE)."""
        return Gate(self.gate, self.gate_entropy)


@dataclass
class SafeStats(PolicyStats):
    """Counts of a SAFE answer."""

    drafted: int = 0
    accepted_drafts: int = 0
    overrides: int = 0  # ensembled tokens that differ from what the drafter would have chosen
    verification_calls: int = 0
    verified_positions: int = 0
    unreliable: int = 0  # positions to check that no verifier could be asked about reliably

    def figures(self, tokens: int) -> dict[str, Any]:
        return {"drafted_tokens": self.drafted,
                "draft_acceptance_rate": (self.accepted_drafts / self.drafted) if self.drafted else None,
                "overridden_tokens": self.overrides, "verification_calls": self.verification_calls,
                # Positions the gate or a faithful cycle wanted checked but that were left to the drafter because a
                # re-tokenizing verifier's view of them was unreliable (mid-character, a boundary it does not share).
                "unreliable_positions": self.unreliable}

    def summary(self, figures: dict[str, Any]) -> list[str]:
        rate = figures.get("draft_acceptance_rate")
        return [] if rate is None else [f"drafts accepted {rate:.0%}"]


@dataclass
class Verdict:
    """Outcome of verifying one draft: how many drafted tokens stand, what replaces the next one (the
    ensembled key and the member whose candidate won), and drafted tokens the ensemble confirmed."""

    accepted: int
    replacement: tuple | None = None
    confirmed: dict[int, str] = field(default_factory=dict)
    # (asked for log-probabilities) position -> the lane of the member whose candidate won there, its distribution
    scorer: dict[int, tuple[Lane, Any]] = field(default_factory=dict)


@register
class SafePolicy(Policy):
    """SAFE with UniTE's union; gated when ``options.gate`` is enabled."""

    name = "safe"
    summary = "the drafter writes, the others verify where it is unsure"
    Options = SafeOptions
    Stats = SafeStats
    options: SafeOptions
    stats: SafeStats
    eval_configs = (EvalConfig("safe", {"gate": None}), EvalConfig("safe-gated", {"gate": 0.5}))
    # A verification asks for logits at every drafted position and the next one; a call may raise draft_len.
    max_logits_rows = int(DRAFT_LEN.range[1]) + 1  # type: ignore[index]
    # A drafted token is the drafter's; an ensembled one is scored by the member whose candidate won there.
    logprobs = True

    def start(self) -> None:
        self.d_tokens: list[int] = []  # the drafter's accepted tokens (after its prompt)
        self.pending = None  # drafter's next-token logits for prompt + d_tokens, when known
        self.text_len = 0  # bytes of accepted text
        self._sync_drafter()
        for i, v in enumerate(self.verifiers, 1):
            if self.twin[i] is None:
                v.feed(v.prompt)  # prefill now: the prompt's cost is not charged to the first verification

    def _sync_drafter(self) -> None:
        """Bring the drafter's cache to prompt + accepted tokens (dropping rejected drafts, feeding an
        ensembled string's tokens) and get its next-token logits."""
        self.pending = self.next_dist(self.drafter, self.d_tokens)

    @property
    def drafter(self) -> Lane:
        return self.lanes[0]

    @property
    def verifiers(self) -> list[Lane]:
        return self.lanes[1:]

    # -- the cycle -----------------------------------------------------------------------------------------

    def step(self, budget: int) -> list[Piece]:
        d = self.drafter
        if self.pending is None:
            self._sync_drafter()
        n = min(self.options.draft_len, budget, d.room)
        if n < 1:
            raise ContextFull
        drafts, dists = self._draft(n)
        data = [d.member.token_bytes(t) for t in drafts]  # EOG and other control tokens carry no bytes
        offsets = np.cumsum([0] + [len(b) for b in data])  # offsets[j] = bytes before draft token j
        if self.verifiers:  # alone, the drafter's tokens are its answer: nothing is drafted for anyone to accept
            self.stats.drafted += len(drafts)

        check = self._positions_to_check(dists)
        verdict = Verdict(len(drafts))
        if check and self.verifiers:
            verdict = self._verify(drafts, dists, data, offsets, check)
        return self._commit(drafts, data, verdict, dists)

    def _draft(self, n: int) -> tuple[list[int], list]:
        """Up to n drafted tokens. With the gate on, drafting stops at the first unsure token *before*
        decoding it: only it will be checked, so nothing after it is drafted in vain."""
        d = self.drafter
        gate = self.options.gating
        drafts, dists = [], []
        dist = self.pending
        self.pending = None
        # A server drafts the rest in one request; its distributions hold while our picks equal its tokens.
        ahead: list | None = [] if self.sampling.greedy and d.drafts_in_one_call else None
        served = None  # the server's own token from ``dist``, when it came from ``ahead``
        for _ in range(n):
            tok = self.pick(dist)
            drafts.append(tok)
            dists.append(dist)
            if d.member.is_eog(tok) or (gate.enabled and not self._confident(dist)):
                return drafts, dists
            if ahead is None:
                dist = d.step(tok, self.temperature)
                continue
            if not ahead or served != tok:
                ahead = d.draft(d.prompt + self.d_tokens + drafts, n - len(drafts) + 1, self.temperature)
            served, dist = ahead.pop(0)
        self.pending = dist  # the next position's distribution, valid if the whole draft is accepted
        return drafts, dists

    def _confident(self, dist) -> bool:
        gate = self.options.gating
        return gate.confident(dist.top1, dist.entropy() if gate.max_entropy is not None else 0.0)

    def _positions_to_check(self, dists) -> list[int]:
        gate = self.options.gating
        if not gate.enabled:
            return list(range(len(dists)))
        return [j for j, dist in enumerate(dists) if not self._confident(dist)]

    def _verify(self, drafts, dists, data, offsets, check) -> "Verdict":
        """Score the draft with every verifier and walk the checked positions."""
        verdict = Verdict(len(drafts))
        extra = b"".join(data)
        previews = [v.track.preview(extra, drafts) for v in self.verifiers]
        base = self.text_len
        # SAFE's OOV-like check, made strict: a position is ensembled only where every re-tokenizing verifier
        # sees it reliably (a character boundary it shares, its next token not running past the drafted one).
        # A verifier that follows the drafter's ids shares every position.
        checkable = [j for j in check
                     if all(v.follows_drafter or reliable_view(ends, extra, base + int(offsets[j]), len(data[j]), base)
                            for v, (_, ends) in zip(self.verifiers, previews))]
        self.stats.unreliable += len(check) - len(checkable)
        if not checkable:
            return verdict
        vdists: list[dict[int, object]] = []
        for i, (v, (toks, ends)) in enumerate(zip(self.verifiers, previews), 1):
            twin = self.twin[i]
            if twin is not None:  # the same loaded model as an earlier member: its distributions
                vdists.append({j: dists[j] for j in checkable} if twin == 0 else vdists[twin - 1])
                self.stats.verification_calls += 1
                continue
            if v.follows_drafter:  # same ids: the row before draft token j, by index
                rows = {j: len(v.prompt) + len(self.d_tokens) + j - 1 for j in checkable}
            else:
                rows = {j: len(v.prompt) + token_ending_at(ends, base + int(offsets[j])) for j in checkable}
            last_needed = max(rows.values())
            target = v.prompt + toks[: last_needed + 1 - len(v.prompt)]
            if len(target) >= v.backend.n_ctx:
                raise ContextFull
            at = v.feed(target, rows=sorted(set(rows.values())), temperature=self.temperature)
            vdists.append({j: at[r] for j, r in rows.items()})
            self.stats.verification_calls += 1
        self.stats.verified_positions += len(checkable)

        d = self.drafter
        weights = [lane.weight for lane in self.lanes]
        for j in checkable:
            key = d.key_of(drafts[j])
            all_dists = [dists[j]] + [vd[j] for vd in vdists]
            p_draft = d.prob_of(dists[j], EOG) if key == EOG else float(dists[j].prob(drafts[j]))
            ps = [p_draft] + [v.prob_of(vd[j], key) for v, vd in zip(self.verifiers, vdists)]
            if self.sampling.greedy:
                agree = [True] + [self._agrees(v, vd[j], key, p) for v, vd, p in zip(self.verifiers, vdists, ps[1:])]
                if consensus(ps, agree, weights):
                    continue
                chosen, winner = self.ensemble_choice(all_dists, self.options.sharpen, self.options.sharpen_lambda,
                                                      prefer=key, tolerance=self.options.tie_tolerance)
            else:
                chosen, winner = self._speculative(key, drafts[j], all_dists)
                if chosen is None:
                    continue
            self.stats.ensembled += 1
            if self.top_logprobs is not None:
                w = [lane.name for lane in self.lanes].index(winner)
                verdict.scorer[j] = (self.lanes[w], all_dists[w])
            if chosen == key:
                verdict.confirmed[j] = winner
                continue  # the ensemble confirms the drafted token: keep walking
            verdict.accepted, verdict.replacement = j, (chosen, winner)
            self.stats.overrides += 1
            return verdict
        return verdict

    def _agrees(self, verifier, dist, key, p_key: float) -> bool:
        """Unanimity test for one verifier: the drafted key is its argmax, or within the tie tolerance."""
        if verifier.argmax_key(dist) == key or (key != EOG and verifier.first_token(key) == dist.argmax):
            return True
        return p_key >= (1.0 - self.options.tie_tolerance) * dist.top1

    def _speculative(self, key, drafted: int, all_dists):
        """Sampling form: accept the drafted key with probability min(1, P_ens / P_proposal), where
        P_proposal is the probability the drafter really drew it with; otherwise sample from the residual
        max(P_ens - P_proposal, 0) over the union, as speculative sampling does."""
        d = self.drafter
        keys, p, q = self.union(all_dists, self.options.sharpen, self.options.sharpen_lambda)
        p = filter_probs(p, self.sampling.top_k, self.sampling.top_p) if len(keys) else p
        if key not in keys:
            keys, p, q = keys + [key], np.append(p, 0.0), np.hstack([q, np.zeros((q.shape[0], 1))])
        proposal = all_dists[0].proposal
        prop = np.array([_proposal_of(d, proposal, k) for k in keys])
        i = keys.index(key)
        p_prop = float(proposal[drafted]) if key != EOG else float(prop[i])
        if self.rng.random() < speculative_accept_probability(float(p[i]), p_prop):
            return None, None
        residual = np.maximum(p - prop, 0.0)
        r = residual / residual.sum() if residual.sum() > 0 else p / p.sum()
        c = int(self.rng.choice(len(keys), p=r))
        return keys[c], self.lanes[int(np.argmax(q[:, c]))].name

    def _commit(self, drafts, data, verdict: "Verdict", dists) -> list[Piece]:
        d = self.drafter
        accepted, replacement = verdict.accepted, verdict.replacement
        pieces: list[Piece] = []
        for j in range(accepted):
            end = d.member.is_eog(drafts[j])
            winner = verdict.confirmed.get(j)
            scored = None if end or self.top_logprobs is None else self._scored(j, drafts[j], data[j], verdict, dists)
            pieces.append(Piece(data[j], "draft" if winner is None else "ensemble", winner, end=end, logprob=scored))
        if self.verifiers:
            self.stats.accepted_drafts += accepted
        self.d_tokens.extend(drafts[:accepted])
        new_text = b"".join(data[:accepted])
        new_tokens = list(drafts[:accepted])
        if accepted < len(drafts) or self.pending is None:
            self.pending = None  # the drafter re-syncs (trim + feed) at the next step
        if replacement is not None:
            chosen, winner = replacement
            overridden = data[accepted] if accepted < len(drafts) else None
            if chosen == EOG:
                pieces.append(Piece(b"", "ensemble", winner, end=True, drafted=overridden))
            else:
                # The chosen candidate is fed to the drafter as its own tokens (maybe several).
                chosen_tokens = d.key_tokens(chosen)
                chosen_data = d.key_bytes(chosen)
                self.d_tokens.extend(chosen_tokens)
                scored = None if self.top_logprobs is None else self._scored(accepted, chosen, chosen_data, verdict,
                                                                             dists)
                pieces.append(Piece(chosen_data, "ensemble", winner, logprob=scored, drafted=overridden))
                new_text += chosen_data
                new_tokens += chosen_tokens
        self.text_len += len(new_text)
        for v in self.verifiers:
            v.track.extend(new_text, new_tokens)  # ids, or a cheap tail re-tokenization; caches catch up lazily
        return pieces


    def _scored(self, j: int, token, data: bytes, verdict: "Verdict", dists):
        """The token emitted at draft position ``j`` (the drafted token id, or the ensemble's candidate key; text
        ``data``) as the model that wrote it scored it: the drafter's own where its draft stood unchecked, the
        winning member's where the ensemble decided (its first token for the text, when it tokenizes
        differently)."""
        lane, dist = verdict.scorer.get(j, (self.drafter, dists[j]))
        if lane is not self.drafter or not isinstance(token, int):
            token = lane.first_token(self.drafter.key_of(token) if isinstance(token, int) else token)
        return self.scored(lane, dist, token, data)


def _proposal_of(lane: Lane, proposal: np.ndarray, key) -> float:
    """The drafter's proposal probability of a union key (EOG pooled; bytes via its own first token)."""
    if key == EOG:
        eog = lane.member.eog_ids
        return float(proposal[eog].sum()) if eog.size else 0.0
    tok = lane.first_token(key)
    return float(proposal[tok]) if tok >= 0 else 0.0
