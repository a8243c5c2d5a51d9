"""A sparse global KV cache for the LoLCATs hybrid (after LoLA, arXiv 2505.23666), and for the gated
students' window (supra/layers/gated.py: the hybrid with zero query features, whose key features then
only feed the recall error below).

Beside the exact window and the sinks, each head keeps up to C = `cache_budget` older key/value pairs
exactly. The cache chooses by document blocks of W (the window): when a query enters block b, block
b-2 has left the window (the terrace's, the query's own block and the previous one; or the sliding
window of the last W tokens). Its tokens (not the sinks, not padding) become candidates together with
the cache's entries, in runs of `chunk` consecutive tokens (a run of block b-2 and a run in the cache
are kept or evicted whole). A run is scored two ways, as the sum over its candidates j of:

- the weight the queries of block b-1 gave j, its share of their whole normaliser (window, sinks,
  cache and linear state): seen_j = sum_{n in block b-1} w_nj / den_n, w_nj = g e^(s_nj - c_n) where
  n saw j exactly. With the terrace, block b-1's queries saw every candidate exactly (b-2 was their
  previous block); with the sliding window a token of block b-2 older than a query's window counts
  with its linear weight fq_n.fk_j (it is not in the state yet: its block is undecided). This is the
  attention each pair has just been receiving, as SnapKV (arXiv 2404.14469) scores a prompt's pairs by its last queries;
- how badly the state would recall j (LoLA's score): err_j = ||v_j - v_hat_j||^2, with
  v_hat_j = fk_j^T S_all[:, :V] / fk_j^T S_all[:, V] and S_all = S + sum_{candidates i} fk_i [v_i, 1].

(C - R) / chunk runs are kept by the first score, then R / chunk more among the rest by the second
(R = `recall`; `CacheRule` in hybrid.py). Why both, and why runs (the demo's model, C = 256; docs/
results.md, "Long context"): attention alone has the best perplexity of the single-pair rules, but the
text after a passkey need not attend it, so the key leaves the cache; recall error alone keeps unusual
tokens but costs perplexity; and the model retrieves a key only with the words around it, which runs
keep together.

The chosen runs stay in the cache (a tie keeps the older run), the other candidates go into
the linear state (S += fk_j [v_j, 1]). Cache entries are attended in the softmax part, with the same
gate and the same max c as the window:

    y = [g sum_{window + sinks + cache} e v + fq^T S[:, :V]] / [g sum e + fq^T S[:, V]].

A token the cache never took is weighted fq.fk_j, as without the cache, so C = 0 is the hybrid without a cache.

Three forms make the same choices: `parallel_cached_hybrid_attention` (the definition, T x T masks,
for tests and measurements), `cached_hybrid_attention` (a loop over document blocks, vectorised over
rows and heads: prefill, evaluation and training on every device), and `decide_at_block_start`, which
the decode step (`window_hybrid_step`) calls when a row enters a new block; the step adds each query's
shares to the state's `cache_seen` and `ring_seen` (hybrid.ring_step). They share `choose` and
`decide`. The cache is C slots per row and head (k, v with the ones column, fk for when it is evicted
into the state, valid, seen): constant memory in decode. The choice is not differentiated; the kept
pairs are.

With grouped-query attention (`CacheRule.groups` query heads per key/value head) a group's heads see
the same keys and values, so they choose together, by the sum of their scores, and the cache holds the
group's k, v, valid and ages once, as the original's KV cache does; fk and the shares stay per head
(each head has its own features and linear state). On the demo's model (3 query heads per key/value
head) the cache's k and v take a third of the memory (docs/results.md, "One cache per key/value head").

With a decayed linear part (`log_decay`, hybrid.py) a token in the linear state counts for query n
with gamma^(n-j), j its own place, whether it was folded at a block start or evicted from the cache
later; cache entries themselves are attended undecayed, like the window. So each entry also keeps its
age (cache_age: places before the state's newest token), and at a block start every candidate enters
the state with gamma^age, the state being taken at the place before the block's first token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hybrid import CacheRule, HybridState, per_head, powers, stack_states, state_row, take_sinks
from .reference import state_dtype


def recall_errors(kv: torch.Tensor, fk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """err_j = ||v_j - fk_j^T kv[:, :V] / fk_j^T kv[:, V]||^2: kv (B, H, F, V + 1), fk (B, H, N, F),
    v (B, H, N, V + 1) with the ones column -> (B, H, N). NaN where fk_j is zero (no token)."""
    recalled = fk @ kv
    return (v[..., :-1] - recalled[..., :-1] / recalled[..., -1:]).square().sum(-1)


def choose(seen: torch.Tensor, valid: torch.Tensor, budget: int, chunk: int = 1,
           errors: torch.Tensor | None = None, recall: int = 0) -> torch.Tensor:
    """Indices (B, Hg, budget) of the candidates kept, in candidate order: budget / chunk runs of
    `chunk` consecutive candidates (N, the candidates' count, a multiple of chunk). `seen` and
    `errors` are per query head (B, H, N), `valid` per group of heads that choose together (B, Hg, N;
    Hg divides H). A run scores the sum over its group's heads and its valid candidates of `seen`;
    with `recall` > 0, that many pairs' runs are then chosen among the rest by the sum of `errors`
    instead. Runs come oldest first, and a stable sort keeps the older of equal scores; with fewer
    valid runs than asked for, runs without a valid candidate fill the rest."""
    run_valid = valid.unflatten(-1, (-1, chunk)).any(-1)
    groups = seen.shape[1] // valid.shape[1]

    def per_run(x: torch.Tensor) -> torch.Tensor:
        summed = torch.where(per_head(valid, groups), x, 0.0).nan_to_num(0.0).unflatten(1, (-1, groups)).sum(2)
        return summed.unflatten(-1, (-1, chunk)).sum(-1)

    def largest(scores: torch.Tensor, count: int) -> torch.Tensor:
        return scores.masked_fill(~run_valid, float("-inf")).sort(dim=-1, descending=True, stable=True).indices[
            ..., :count]

    runs = largest(per_run(seen), (budget - recall) // chunk)
    if recall:  # the runs attention chose rank first, then the rest by recall error
        first = torch.zeros_like(run_valid).scatter_(-1, runs, True)
        runs = largest(per_run(errors).masked_fill(first, float("inf")), budget // chunk)
    runs = runs.sort(-1).values
    return (runs[..., None] * chunk + torch.arange(chunk, device=runs.device)).flatten(-2)


def decay_weights(log_decay: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """gamma_h^age for ages (B, H, N) >= 0: what each token weighs in a state taken age places after it."""
    return (log_decay.view(1, -1, 1) * age).exp()


def decide(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fk: torch.Tensor, valid: torch.Tensor,
           seen: torch.Tensor, rule: CacheRule, log_decay: torch.Tensor | None = None,
           age: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The candidates k (B, Hg, N, D), v (B, Hg, N, V + 1), valid (B, Hg, N) per group of
    `rule.groups` query heads, fk (B, H, N, F) per head, oldest first, with the weight the last
    block's queries gave each (seen, B, H, N), against the linear state kv (B, H, F, V + 1): the new
    state (the candidates not kept folded in) and the new cache k, v, fk, valid, `rule.budget` slots
    each. With log_decay (H,), age (B, Hg, N) is each candidate's places before kv's place:
    candidates enter the state with gamma^age, and the kept ones' ages come back last. Recall errors
    are taken against the state that would hold every candidate, with the undecayed fk_j (v_hat_j
    does not change when fk_j is scaled, and a strongly decayed one would underflow)."""
    G = rule.groups
    v_heads = per_head(v, G)
    fk = fk * per_head(valid, G)[..., None]
    into_state = fk if log_decay is None else fk * decay_weights(log_decay, per_head(age, G))[..., None]
    with torch.no_grad():
        errors = recall_errors(kv + into_state.transpose(-1, -2) @ v_heads, fk, v_heads) if rule.recall else None
        idx = choose(seen.detach(), valid, rule.budget, rule.chunk, errors, rule.recall)
    kept = torch.zeros_like(valid).scatter_(-1, idx, True)

    def take(x: torch.Tensor, at: torch.Tensor = idx) -> torch.Tensor:
        return x.gather(2, at[..., None].expand(-1, -1, -1, x.shape[-1]))

    folded = into_state * ~per_head(kept, G)[..., None]
    new = (kv + folded.transpose(-1, -2) @ v_heads, take(k), take(v), take(fk, per_head(idx, G)),
           valid.gather(-1, idx))
    return new if log_decay is None else (*new, age.gather(-1, idx))


def empty_cache(B: int, H: int, rule: CacheRule, D: int, E: int, Fd: int, like: torch.Tensor,
                decayed: bool = False) -> tuple[torch.Tensor, ...]:
    """An empty cache of H query heads: k (B, Hg, C, D), v (B, Hg, C, E + 1), fk (B, H, C, F), valid
    (B, Hg, C), and with a decay the entries' ages (B, Hg, C) long (Hg = H / rule.groups)."""
    Hg, C = H // rule.groups, rule.budget
    cache = (like.new_zeros(B, Hg, C, D), like.new_zeros(B, Hg, C, E + 1), like.new_zeros(B, H, C, Fd),
             torch.zeros(B, Hg, C, dtype=torch.bool, device=like.device))
    return (*cache, torch.zeros(B, Hg, C, dtype=torch.long, device=like.device)) if decayed else cache


def cached_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_gate: torch.Tensor,
    window: int,
    state: HybridState | None,
    output_final_state: bool,
    sinks: int,
    cache: CacheRule,
    log_decay: torch.Tensor | None = None,
    terrace: bool = True,
) -> tuple[torch.Tensor, HybridState | None]:
    """The hybrid with the cache `cache` chooses, one document block of queries at a time; the other
    arguments as `window_hybrid_attention`. The state it returns is the decoder's: the ring holds the
    last 2W tokens, and the ones of a block already decided have fk zero, since they are in the cache
    or the linear state. Decayed, kv and the cache's ages are taken at the newest token, as the decode
    step keeps them. With the sliding window (`terrace` False) a query's previous block is exact only
    inside its last W tokens; its older tokens are linear (fq.fk_j, decayed by their distance) until
    their block is decided."""
    B, T, H, D = q.shape
    W = window
    if state is not None and bool((state.phase != state.phase[0]).any()):
        # Rows at different places in their blocks decide at different tokens: one row at a time.
        rows = [cached_hybrid_attention(*(x[b:b + 1] for x in (q, k, v, fq, fk)), window_gate, W,
                                        state_row(state, b), output_final_state, sinks, cache, log_decay, terrace)
                for b in range(B)]
        return torch.cat([y for y, _ in rows]), (stack_states([f for _, f in rows]) if output_final_state else None)
    E, Fd = v.shape[-1], fk.shape[-1]
    cache_budget, G = cache.budget, cache.groups
    if H % G:
        raise ValueError(f"a sparse cache shared by groups of {G} heads needs a multiple of {G} heads, got {H}")
    acc = state_dtype(q.dtype)
    log_decay = None if log_decay is None else log_decay.to(acc)
    p = 0 if state is None else int(state.phase[0])  # the first new token's place in its block
    nb = -(-(p + T) // W)
    back = nb * W - p - T

    # X (B, H, 2W + T + back, .): the ring (the document's last 2W tokens; empty without a state),
    # the new tokens, padding. Block i of this call's queries (the document's block cur + i) sees
    # X[a + iW : a + (i + 1)W] as its previous block and the next W places as its own, a = W - p.
    def places(new: torch.Tensor, ring: torch.Tensor | None) -> torch.Tensor:
        ring = new.new_zeros(B, H, 2 * W, new.shape[-1], dtype=acc) if ring is None else ring.to(acc)
        return torch.cat([ring, F.pad(new.to(acc), (0, 0, 0, 0, 0, back)).transpose(1, 2)], dim=2)

    held = () if state is None else (state.k, state.v[..., :-1], state.fk, state.valid[..., None])
    rings = (None,) * 4 if state is None else tuple(x.roll(-state.next_slot, dims=x.dim() - 2) for x in held)
    kx, vx, fkx = (places(x, r) for x, r in zip((k, v, fk), rings))
    vx = torch.cat([vx, torch.ones_like(vx[..., :1])], dim=-1)  # in every slot: a step writes only v
    sink_k, sink_v, sink_valid, arrival, is_sink = take_sinks(k, v, state, sinks, acc)
    valid = torch.zeros(B, 2 * W + T + back, dtype=torch.bool, device=q.device)
    valid[:, 2 * W:2 * W + T] = ~is_sink  # a sink is attended through its own slot only
    if state is not None:
        valid[:, :2 * W] = rings[3][..., 0]
    fkx = fkx * valid[:, None, :, None]  # padding and sinks never enter the state or the cache
    qb, fqb = (F.pad(x.to(acc), (0, 0, 0, 0, p, back)).view(B, nb, W, H, -1).permute(0, 3, 1, 2, 4) for x in (q, fq))
    # seen: per X place, the weight its next block's queries gave it (what the choice is scored by)
    seen = torch.zeros(B, H, kx.shape[2], dtype=acc, device=q.device)
    if state is None:
        kv = q.new_zeros(B, H, Fd, E + 1, dtype=acc)
        slots = empty_cache(B, H, cache, D, E, Fd, kv, decayed=log_decay is not None)
        cache_seen = seen.new_zeros(B, H, cache_budget)
    else:
        kv = state.kv.to(acc)
        slots = tuple(x.to(acc) for x in (state.cache_k, state.cache_v, state.cache_fk)) + (state.cache_valid,)
        if log_decay is not None:
            slots = (*slots, state.cache_age)
        seen[:, :, :2 * W] = state.ring_seen.roll(-state.next_slot, dims=2)
        cache_seen = state.cache_seen.to(acc)

    own_mask = torch.ones(W, W, dtype=torch.bool, device=q.device).tril()  # [r, s]: key s is not after query r
    # The sliding window: query r of a block sees key s of the previous block exactly if s > r, linearly if not
    prev_mask = own_mask.new_ones(W, W) if terrace else ~own_mask
    if not terrace and log_decay is not None:  # key s of the previous block is W + r - s places before query r
        r = torch.arange(W, device=q.device)
        prev_decay = powers(log_decay, W + r[:, None] - r[None, :]).unsqueeze(0)  # (1, H, W, W)
    gate = window_gate.to(acc).view(1, H, 1, 1)
    scale = D**-0.5
    a = W - p
    decided = 0  # X places before this one are in the cache or the state
    held_at = 2 * W - 1  # decayed: the X place kv and the cache's ages are taken at (the ring's newest token)

    def move(to: int) -> None:  # decay kv and age the cache from held_at to X place `to` >= held_at
        nonlocal kv, held_at
        kv = kv * (log_decay * (to - held_at)).exp().view(1, H, 1, 1)
        slots[4] = slots[4] + (to - held_at)
        held_at = to

    slots = list(slots)
    outs = []
    for i in range(nb):
        if i or p == 0:  # the query enters its block here: the block two back leaves the window
            lo = a + (i - 1) * W
            block_valid = valid[:, None, lo:lo + W].expand(-1, H // G, -1)
            # a group's heads hold the same keys and values: one copy of each is a candidate
            candidates = [torch.cat([c, x[:, ::step, lo:lo + W]], dim=2)
                          for c, x, step in zip(slots, (kx, vx, fkx), (G, G, 1))]
            decay = ()
            if log_decay is not None:  # taken at the place before the block's first query
                move(lo + 2 * W - 1)
                block_age = (held_at - lo - torch.arange(W, device=q.device)).expand(B, H // G, W)
                decay = (log_decay, torch.cat([slots[4], block_age], dim=-1))
            kv, *slots = decide(kv, *candidates, torch.cat([slots[3], block_valid], dim=-1),
                                torch.cat([cache_seen, seen[:, :, lo:lo + W]], dim=-1), cache, *decay)
            cache_seen = torch.zeros_like(cache_seen)
            decided = lo + W
        prev, own = slice(a + i * W, a + (i + 1) * W), slice(a + (i + 1) * W, a + (i + 2) * W)
        query = qb[:, :, i]
        place = torch.arange(W, device=q.device) + i * W - p  # the queries' indices in this call
        parts = [(query @ kx[:, :, prev].transpose(-1, -2) * scale).masked_fill(
                     ~(prev_mask & valid[:, None, None, prev]), float("-inf")),
                 (query @ kx[:, :, own].transpose(-1, -2) * scale).masked_fill(~(own_mask & valid[:, None, None, own]),
                                                                               float("-inf")),
                 (query @ per_head(slots[0], G).transpose(-1, -2) * scale).masked_fill(
                     ~per_head(slots[3], G)[:, :, None], float("-inf"))]
        values = [vx[:, :, prev], vx[:, :, own], per_head(slots[1], G)]
        if sinks:
            arrived = sink_valid[:, None, None] & (arrival[:, None, None] <= place[:, None])
            parts.append((query @ sink_k.transpose(-1, -2) * scale).masked_fill(~arrived, float("-inf")))
            values.append(sink_v)
        scores = torch.cat(parts, dim=-1)
        c = scores.amax(-1, keepdim=True)
        c = c.masked_fill(~torch.isfinite(c), 0.0)  # padded queries may see no key at all
        fq_i = fqb[:, :, i]
        if log_decay is not None:  # query r is at X place a + (i + 1)W + r; padded ones may precede kv's place
            ahead = (a + (i + 1) * W + torch.arange(W, device=q.device) - held_at).clamp(min=0)
            fq_i = fq_i * powers(log_decay, ahead).view(1, H, W, 1)
        weights = gate * (scores - c).exp()
        if not terrace:  # the previous block's keys that left the sliding window, not yet decided: linear
            linear_prev = (fqb[:, :, i] @ fkx[:, :, prev].transpose(-1, -2)) * own_mask
            if log_decay is not None:
                linear_prev = linear_prev * prev_decay
            weights = torch.cat([weights[..., :W] + linear_prev, weights[..., W:]], dim=-1)
        out = weights @ torch.cat(values, dim=2) + fq_i @ kv
        padded = (place < 0) | (place >= T)
        den = out[..., E:] + padded[:, None]  # keeps padded rows finite
        outs.append(out[..., :E] / den)
        shares = (weights / den).detach() * ~padded[:, None]
        seen[:, :, prev] += shares[..., :W].sum(2)
        cache_seen = cache_seen + shares[..., 2 * W:2 * W + cache_budget].sum(2)
    y = torch.stack(outs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, nb * W, H, E)[:, p:p + T]

    final = None
    if output_final_state:  # the ring is X's last 2W places, oldest first; decided ones carry no fk
        ring = slice(T, T + 2 * W)
        if log_decay is not None:
            move(2 * W + T - 1)
        undecided = torch.arange(T, T + 2 * W, device=q.device) >= decided
        final = HybridState(kv, kx[:, :, ring].contiguous(), vx[:, :, ring].contiguous(),
                            (fkx[:, :, ring] * undecided[:, None]).contiguous(), valid[:, ring].clone(), sink_k,
                            sink_v, sink_valid, torch.full((B,), (p + T) % W, device=q.device), 0, terrace, *slots,
                            cache_seen=cache_seen, ring_seen=seen[:, :, ring].contiguous(), cache_rule=cache)
    return y.to(q.dtype), final


def decide_at_block_start(state: HybridState, log_decay: torch.Tensor | None = None) -> None:
    """The decode step's form, before the ring's oldest slot is overwritten: for the rows whose new
    token starts a block (phase 0), the ring's W oldest slots (block b-2) and the cache decide, in
    place; those slots' fk become zero, so leaving the ring adds nothing more to the state. Decayed,
    kv and the ages are still at the previous token, the place before the block's first."""
    if (state.cache_age is None) != (log_decay is None):  # ages are what evicted entries decay by
        raise ValueError("the state's cache was made with a different decay (with or without) than the step's")
    starting = state.phase == 0
    if not bool(starting.any()):
        return
    B, Hg = state.cache_k.shape[:2]
    G = state.cache_rule.groups
    ring = state.k.shape[2]
    idx = (state.next_slot + torch.arange(ring // 2, device=state.kv.device)) % ring
    block_valid = state.valid[:, None, idx].expand(-1, Hg, -1)
    candidates = (torch.cat([c, x[:, ::step][:, :, idx]], dim=2) for c, x, step in zip(
        (state.cache_k, state.cache_v, state.cache_fk), (state.k, state.v, state.fk), (G, G, 1)))
    decay = ()
    if log_decay is not None:  # the slot m places after the oldest is ring - 1 - m before the newest token
        block_age = (ring - 1 - torch.arange(ring // 2, device=state.kv.device)).expand(B, Hg, -1)
        decay = (log_decay.to(state.kv.dtype), torch.cat([state.cache_age, block_age], dim=-1))
    seen = torch.cat([state.cache_seen, state.ring_seen[:, :, idx]], dim=-1)
    new = decide(state.kv, *candidates, torch.cat([state.cache_valid, block_valid], dim=-1), seen,
                 state.cache_rule, *decay)
    rows = starting.view(B, 1, 1, 1)
    for old, value in zip((state.kv, state.cache_k, state.cache_v, state.cache_fk), new):
        old.copy_(torch.where(rows, value, old))
    state.cache_valid.copy_(torch.where(starting.view(B, 1, 1), new[4], state.cache_valid))
    if log_decay is not None:
        state.cache_age.copy_(torch.where(starting.view(B, 1, 1), new[5], state.cache_age))
    state.fk[:, :, idx] = state.fk[:, :, idx] * ~rows
    for seen in (state.cache_seen, state.ring_seen):  # the new block's queries score the next choice
        seen.mul_(~starting.view(B, 1, 1))


def parallel_cached_hybrid_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_gate: torch.Tensor,
    window: int,
    sinks: int,
    cache_budget: int,
    log_decay: torch.Tensor | None = None,
    cache_chunk: int = 1,
    cache_recall: int = 0,
    terrace: bool = True,
    cache_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query n's unnormalised weight on key j (B, H, T, T), in its two parts: the exact one (window,
    sinks and cached pairs: g e^(s_nj - c_n)) and the linear one (fq_n . fk_j, decayed: times
    gamma^(n-j)), zero where the other part holds the key. One document per row from its first token.
    Entering block b, the cache is chosen among its previous entries and block b-2 by the weights
    block b-1's queries gave them (exact or linear), normalised over their whole rows, and by their
    recall errors against the sum over every token of blocks <= b-2 (what the state and the
    candidates hold together; decayed, token j weighs gamma^(bW-1-j) in it); `cache_groups` heads in
    a row (those sharing a key/value head) choose together, by their summed scores. `terrace` False:
    the sliding window of the last W tokens, with the same block-wise choice."""
    B, T, H, D = q.shape
    W = window
    acc = state_dtype(q.dtype)
    qf, kf, vf, fqf, fkf = (x.to(acc).transpose(1, 2) for x in (q, k, v, fq, fk))
    vo = torch.cat([vf, torch.ones_like(vf[..., :1])], dim=-1)
    n = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    block = torch.arange(T, device=q.device) // W
    sink = torch.arange(T, device=q.device) < sinks
    first = (n // W - 1) * W if terrace else n - W + 1
    soft = (j <= n) & ((j >= first) | sink[None])
    scores = qf @ kf.transpose(-1, -2) * D**-0.5
    gate = window_gate.to(acc).view(1, -1, 1, 1)
    linear = (fqf @ fkf.transpose(-1, -2)) * ((j < first) & ~sink[None])
    if log_decay is not None:
        linear = linear * powers(log_decay.to(acc), (n - j).clamp(min=0))

    def weights(rows: torch.Tensor, cached_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the query rows (T,) bool, with the pairs each attends in the cache (B, H, rows, T)
        exact = scores[:, :, rows].masked_fill(~(soft[rows] | cached_rows), float("-inf"))
        return gate * (exact - exact.amax(-1, keepdim=True)).exp(), linear[:, :, rows] * ~cached_rows

    member = torch.zeros(B, H // cache_groups, T, dtype=torch.bool, device=q.device)  # in a group's cache now
    cached = torch.zeros(B, H, T, T, dtype=torch.bool, device=q.device)  # [n, j]: query n attends j exactly
    cache = CacheRule(cache_budget, cache_chunk, cache_recall, cache_groups)
    tail = -T % cache.chunk  # runs are whole: the last one padded with no tokens

    def padded(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, tail))

    for b in range(2, -(-T // W)):
        exact, linear_part = weights(block == b - 1, cached[:, :, block == b - 1])
        seen = ((exact + linear_part) / (exact + linear_part).sum(-1, keepdim=True)).sum(2)
        candidates = member | ((block == b - 2) & ~sink)
        errors = None
        if cache.recall:
            into_state = fkf * ((block <= b - 2) & ~sink)[:, None]
            if log_decay is not None:
                into_state = into_state * powers(log_decay.to(acc), (b * W - 1 - j[0]).clamp(min=0))[None, ..., None]
            errors = padded(recall_errors(into_state.transpose(-1, -2) @ vo, fkf, vo))
        idx = choose(padded(seen), padded(candidates), cache.budget, cache.chunk, errors, cache.recall)
        member = padded(torch.zeros_like(member)).scatter_(-1, idx, padded(candidates).gather(-1, idx))[..., :T]
        cached[:, :, block == b] = per_head(member, cache_groups)[:, :, None]
    return weights(torch.ones(T, dtype=torch.bool, device=q.device), cached)


def parallel_cached_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_gate: torch.Tensor,
    window: int,
    sinks: int,
    cache_budget: int,
    log_decay: torch.Tensor | None = None,
    cache_chunk: int = 1,
    cache_recall: int = 0,
    terrace: bool = True,
    cache_groups: int = 1,
) -> torch.Tensor:
    """The definition with full T x T masks (`parallel_cached_hybrid_weights`), for tests."""
    exact, linear = parallel_cached_hybrid_weights(q, k, v, fq, fk, window_gate, window, sinks, cache_budget,
                                                   log_decay, cache_chunk, cache_recall, terrace, cache_groups)
    weights = exact + linear
    y = (weights @ v.to(weights.dtype).transpose(1, 2)) / weights.sum(-1, keepdim=True)
    return y.transpose(1, 2).to(q.dtype)
