"""LoLCATs hybrid attention: exact softmax over a sliding window, linear attention for older tokens.

For query n, with window W, gate g_h = sigmoid(factor_h), and feature maps fq, fk:

    y_n = [ g * sum_{j in soft(n)} e_nj v_j  +  fq_n^T sum_{j in old(n)} fk_j v_j^T ]
          / [ g * sum_{j in soft(n)} e_nj     +  fq_n^T sum_{j in old(n)} fk_j ]
    e_nj = exp(q_n.k_j / sqrt(d) - c_n),  c_n = max of the scores over soft(n)
    soft(n) = {first(n) <= j <= n} + sinks,  old(n) = {j < first(n)} - sinks
    first(n) = n - W + 1 (sliding window),  or  W (floor(n / W) - 1) (terrace)

The terrace (LoLCATs' main results) splits the document into blocks of W from its first token: a
query sees its own block up to itself and the whole previous block exactly (W+1 to 2W keys).

`sinks` (S, default 0: LoLCATs) keeps the first S tokens of the document in the exact softmax part
for good: pretrained models park most of a head's attention on the first token (an "attention
sink", StreamingLLM), a spike that a positive feature map reproduces badly once that token has left
the window. A sink that is also inside the window counts once.

This module holds the torch forms; the ops model code calls, `window_hybrid_attention` and
`window_hybrid_step`, are in `dispatch.py`, which picks these, the Triton kernels (`triton_hybrid.py`)
or the sparse cache's forms. `blocked_hybrid_attention` works in blocks of W queries: each block sees
its own and the previous block of keys exactly and everything older through a running linear state,
so no T x T matrix is ever formed. `ring_step` is the decoder's one-token form of the same sum.

Their state is what a decoder keeps: the linear state over tokens that left the window (F x (V+1),
the last column is the denominator), a ring buffer of the last W tokens' k, v and fk, and the S sink
tokens' k, v. Slot `next_slot` holds the oldest of the ring, which the next token pushes out of the
window: the step moves it into the linear state and writes the new token into its slot, so a step
touches W + S keys and one F x (V+1) state, allocates no buffer and concatenates nothing. `valid`
marks ring slots that hold no token of the row's current document (left padding, packed documents,
prompts shorter than W) or hold a sink, which lives in its own slots; `sink_valid` marks the sink
slots filled so far (a document shorter than S fills the rest while it decodes).

With the terrace the ring holds the last 2W tokens, and `phase` (per row: rows of a batch start
their documents at different places) counts the tokens of the current block. A step's softmax part
is the ring's newest W + phase + 1 tokens; the ring's older ones are linear, weighted by fq.fk_j in
the same product as the softmax weights, and enter the linear state when they leave the ring (so no
block of W is folded into the state at a block's end). The blocked form (`terrace_hybrid_attention`)
aligns its query blocks with the document's; rows at different places in their blocks, which a
carried state can hold, run one at a time.

`log_decay` (H,), log gamma_h <= 0 (default None: no decay) decays the linear part: old token j
enters query n's numerator and denominator with weight gamma_h^(n-j) fq_n.fk_j; the window and sink
softmax terms are not decayed. Undecayed, the linear sum grows with the context and, past the
training length, takes the shared denominator from the exact window; decayed, it stays bounded. The
state's kv then holds sum_j gamma^(t-j) fk_j [v_j, 1] for the newest token t: a step decays it by
gamma, adds the token leaving the ring with gamma^R (R: the ring's length), and weights the
terrace's ring-older linear terms by gamma^age. The blocked forms carry each block's state decayed to
the place before its first query (no power of gamma above 1 is ever formed, so nothing overflows).
The Triton kernels have no decay: a call with one runs the torch blocked form on CUDA too.

With a sparse global cache (`cache_budget` > 0; `sparse_cache.py`) the state also holds C pairs per
head attended exactly; the step decides, when a row enters a block, which of the block two back join
the cache and which the linear state, and the blocked form is that module's. The choice goes by
document blocks of W with either window, so a sliding window's state with a cache also keeps a ring
of 2W and a phase: the ring's tokens older than the window are linear until their block is decided.
The cache composes with the decay: a token in the linear state weighs gamma^(n-j) however it got there
(folded at a block start or evicted from the cache later); the cache's pairs are attended undecayed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .reference import state_dtype

# Tokens per pass of the blocked form. A pass's temporaries (scores of W x 2W per block, the block
# states) stay in cache at this size; past it, one pass over a long prompt grew faster than T.
SEGMENT_TOKENS = 1024


class CacheRule(NamedTuple):
    """How a sparse cache (sparse_cache.py) chooses: `budget` pairs per group, kept and evicted in runs
    of `chunk` consecutive tokens; `recall` of them are the runs the state recalls worst, the rest
    the runs the last block attended most. `groups` query heads share one key/value head (GQA): they
    choose together and the cache holds their pairs once."""
    budget: int
    chunk: int = 1
    recall: int = 0
    groups: int = 1


class HybridState(NamedTuple):
    kv: torch.Tensor  # (B, H, F, V + 1): sum of fk_j [v_j, 1] over tokens that left the ring
    k: torch.Tensor  # (B, H, R, D) ring buffer of the last R tokens (R = W; 2W for the terrace or with a cache)
    v: torch.Tensor  # (B, H, R, V + 1), last column 1: the window's denominator comes out of one product
    fk: torch.Tensor  # (B, H, R, F), zero in invalid slots: they add nothing when they leave the ring
    valid: torch.Tensor  # (B, R) bool: False for slots that hold no token of this row's document, or a sink
    sink_k: torch.Tensor  # (B, H, S, D): the document's first S tokens
    sink_v: torch.Tensor  # (B, H, S, V + 1), last column 1
    sink_valid: torch.Tensor  # (B, S) bool: sink slots filled so far
    phase: torch.Tensor  # (B,) long: the row's tokens in its current block (0 for a sliding window without a cache)
    next_slot: int  # the slot of the oldest token, which the next token replaces
    terrace: bool = False
    # The sparse global cache (sparse_cache.py; None without one): C pairs per row and head beyond the window
    # Hg = H / cache_rule.groups: a group of query heads shares its pairs, as it shares its key/value head
    cache_k: torch.Tensor | None = None  # (B, Hg, C, D)
    cache_v: torch.Tensor | None = None  # (B, Hg, C, V + 1), last column 1
    cache_fk: torch.Tensor | None = None  # (B, H, C, F): what an evicted entry adds to each head's linear state
    cache_valid: torch.Tensor | None = None  # (B, Hg, C) bool: slots that hold a pair
    cache_age: torch.Tensor | None = None  # (B, Hg, C) long, with a decay: each pair's places before the newest token
    # What the next choice is scored by: the weight the current block's queries gave so far to each cached pair
    # and to each token of the previous block (its ring slots; zero in the others)
    cache_seen: torch.Tensor | None = None  # (B, H, C)
    ring_seen: torch.Tensor | None = None  # (B, H, R)
    cache_rule: CacheRule | None = None


# The fields that hold one entry per row (all but next_slot, terrace): what selecting or stacking rows touches.
ROW_FIELDS = ("kv", "k", "v", "fk", "valid", "sink_k", "sink_v", "sink_valid", "phase",
              "cache_k", "cache_v", "cache_fk", "cache_valid", "cache_age", "cache_seen", "ring_seen")


def per_head(x: torch.Tensor, groups: int) -> torch.Tensor:
    """A group's tensor (B, H / groups, ...) for each of its query heads (B, H, ...)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def state_row(state: HybridState, row: int) -> HybridState:
    """Row `row` of a state, as a state of one row."""
    return state._replace(**{f: getattr(state, f)[row:row + 1] for f in ROW_FIELDS if getattr(state, f) is not None})


def stack_states(states: list[HybridState]) -> HybridState:
    """Stack states of the same kind whose rings all start at slot 0 (each from a whole-sequence call)."""
    return states[0]._replace(**{f: torch.cat([getattr(s, f) for s in states]) for f in ROW_FIELDS
                                 if getattr(states[0], f) is not None}, next_slot=0)


def take_sinks(k: torch.Tensor, v: torch.Tensor, state: HybridState | None, sinks: int,
               acc: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The sink slots after this call's tokens (B, T, H, .) join them: sink_k (B, H, S, D), sink_v
    (B, H, S, E + 1), filled (B, S); and for the attention, arrival (B, S), the index in this call of
    each slot's token (-1 for a token of an earlier call), and is_sink (B, T)."""
    B, T, H, D = k.shape
    E = v.shape[-1]
    if state is None:
        held = torch.zeros(B, dtype=torch.long, device=k.device)
        sink_k, sink_v = k.new_zeros(B, H, sinks, D, dtype=acc), k.new_zeros(B, H, sinks, E + 1, dtype=acc)
        filled = torch.zeros(B, sinks, dtype=torch.bool, device=k.device)
    else:
        held = state.sink_valid.sum(-1)
        sink_k, sink_v, filled = state.sink_k.to(acc), state.sink_v.to(acc), state.sink_valid
    arrival = torch.arange(sinks, device=k.device)[None] - held[:, None]
    new = (arrival >= 0) & (arrival < T)
    if bool(new.any()):
        source = arrival.clamp(0, T - 1)[:, None, :, None]  # (B, 1, S, 1): gather along T

        def gathered(x: torch.Tensor) -> torch.Tensor:
            x = x.to(acc).transpose(1, 2)
            return x.gather(2, source.expand(-1, x.shape[1], -1, x.shape[-1]))

        sink_k = torch.where(new[:, None, :, None], gathered(k), sink_k)
        sink_v = torch.cat([torch.where(new[:, None, :, None], gathered(v), sink_v[..., :E]),
                            torch.ones_like(sink_v[..., :1])], dim=-1)
    is_sink = (held[:, None] + torch.arange(T, device=k.device)[None]) < sinks
    return sink_k, sink_v, filled | new, arrival.masked_fill(~new, -1), is_sink


def ring_in_time_order(state: HybridState) -> tuple[torch.Tensor, ...]:
    """The ring's k, v, fk as (B, W, H, .) from oldest to newest, and valid (B, W)."""
    s = state.next_slot
    return (*(x.roll(-s, dims=2).transpose(1, 2) for x in (state.k, state.v[..., :-1], state.fk)),
            state.valid.roll(-s, dims=1))


def powers(log_decay: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """gamma_h^exponent as (H, *exponent.shape), for exponents >= 0."""
    return (log_decay.view(-1, *(1,) * exponent.dim()) * exponent).exp()


def entering_states(fkb: torch.Tensor, vb: torch.Tensor, kv0: torch.Tensor, nb: int,
                    log_decay: torch.Tensor | None) -> torch.Tensor:
    """The linear state entering each query block b (B, H, nb, F, E+1): kv0 (the state before key
    block 0) plus key blocks c < b of fkb, vb (B, H, nb+1, W, .). Decayed, block b's state is taken
    at the last place of key block b (the place before its first query), which kv0 must also be."""
    if log_decay is None:
        block_state = fkb[:, :, :nb].transpose(-1, -2) @ vb[:, :, :nb]
        return kv0[:, :, None] + block_state.cumsum(2) - block_state
    W = fkb.shape[3]
    within = powers(log_decay, W - 1 - torch.arange(W, device=fkb.device)).view(1, -1, 1, W, 1)
    block_state = (fkb[:, :, :nb] * within).transpose(-1, -2) @ vb[:, :, :nb]  # at each block's last place
    b = torch.arange(nb, device=fkb.device)
    lag = b[:, None] - b[None, :]
    across = powers(log_decay, lag.clamp(min=0) * W) * (lag > 0)  # (H, nb, nb): block c's state at block b's
    return (torch.einsum("hbc,zhcfe->zhbfe", across, block_state)
            + powers(log_decay, b * W).view(1, -1, nb, 1, 1) * kv0[:, :, None])


def decayed_queries(fqb: torch.Tensor, log_decay: torch.Tensor | None) -> torch.Tensor:
    """fq of query blocks (B, H, nb, W, F), weighted for the states of `entering_states`: query r of a
    block is r + 1 places after the state's."""
    if log_decay is None:
        return fqb
    W = fqb.shape[3]
    return fqb * powers(log_decay, torch.arange(1, W + 1, device=fqb.device)).view(1, -1, 1, W, 1)


def check_hybrid_call(state: HybridState | None, sinks: int, terrace: bool, window: int, cache: CacheRule | None,
                      log_decay: torch.Tensor | None) -> None:
    """ValueError unless a call's settings fit together and match the state it carries in (the
    contract of `dispatch.window_hybrid_attention`)."""
    if state is not None and state.sink_k.shape[2] != sinks:
        raise ValueError(f"the state keeps {state.sink_k.shape[2]} sink tokens, the call asks for {sinks}")
    if state is not None and state.terrace != terrace:
        raise ValueError(f"the state is {'a terrace' if state.terrace else 'a sliding window'}'s, the call asks "
                         f"for {'a terrace' if terrace else 'a sliding window'}")
    if state is not None and state.cache_rule != cache:
        def told(rule: CacheRule | None) -> str:
            return "no sparse cache" if rule is None else (f"a sparse cache of {rule.budget} pairs in runs of "
                                                           f"{rule.chunk}, {rule.recall} by recall error, per "
                                                           f"group of {rule.groups} heads")
        raise ValueError(f"the state keeps {told(state.cache_rule)}, the call asks for {told(cache)}")
    if cache is not None:
        if cache.budget < 1 or cache.chunk < 1 or cache.budget % cache.chunk or window % cache.chunk \
                or cache.recall % cache.chunk or not 0 <= cache.recall <= cache.budget or cache.groups < 1:
            raise ValueError(f"a sparse cache needs a budget >= 1 and a window that are multiples of its chunk, "
                             f"0 <= recall <= budget, a multiple of the chunk too, and groups >= 1; got {cache}, "
                             f"window {window}")
        if state is not None and (state.cache_age is None) != (log_decay is None):
            raise ValueError("the state's cache was made with a different decay (with or without) than the call's")


def blocked_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_gate: torch.Tensor,
    window: int,
    state: HybridState | None,
    output_final_state: bool,
    sinks: int = 0,
    terrace: bool = False,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState | None]:
    """The torch blocked form of `dispatch.window_hybrid_attention` without a cache (its contract), on
    every device, with or without a state: the sliding window's here, the terrace's in
    `terrace_hybrid_attention`."""
    B, T, H, D = q.shape
    segment = window * max(1, SEGMENT_TOKENS // window)
    if T > segment:  # segments carrying the state: every pass has the same working set, at any T
        outs = []
        for start in range(0, T, segment):
            part = (x[:, start:start + segment] for x in (q, k, v, fq, fk))
            y, state = blocked_hybrid_attention(*part, window_gate, window, state, True, sinks, terrace, log_decay)
            outs.append(y)
        return torch.cat(outs, dim=1), (state if output_final_state else None)
    if terrace:
        return terrace_hybrid_attention(q, k, v, fq, fk, window_gate, window, state, output_final_state, sinks,
                                        log_decay)
    E = v.shape[-1]
    W = window
    acc = state_dtype(q.dtype)
    log_decay = None if log_decay is None else log_decay.to(acc)
    P = 0 if state is None else W
    nb = -(-T // W)
    front, back = W - P, nb * W - T

    # The key sequence is [front padding][P cached tokens][T new tokens][back padding]: block 0 ends
    # where the new tokens begin, so query block b sees key blocks b (previous) and b + 1 (its own).
    def key_blocks(new: torch.Tensor, cached: torch.Tensor | None) -> torch.Tensor:
        parts = ([] if cached is None else [cached.to(acc)]) + [new.to(acc)]
        x = F.pad(torch.cat(parts, dim=1), (0, 0, 0, 0, front, back))
        return x.view(B, nb + 1, W, H, -1).permute(0, 3, 1, 2, 4)  # (B, H, nb+1, W, .)

    def query_blocks(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x.to(acc), (0, 0, 0, 0, 0, back)).view(B, nb, W, H, -1).permute(0, 3, 1, 2, 4)

    cached = (None, None, None) if state is None else ring_in_time_order(state)
    kb, vb, fkb = (key_blocks(x, c) for x, c in zip((k, v, fk), cached))
    vb = torch.cat([vb, torch.ones_like(vb[..., :1])], dim=-1)  # ones column carries the denominator
    sink_k, sink_v, sink_valid, arrival, is_sink = take_sinks(k, v, state, sinks, acc)
    valid = torch.zeros(B, (nb + 1) * W, dtype=torch.bool, device=q.device)
    valid[:, front + P:front + P + T] = ~is_sink  # a sink is attended through its own slot only
    if state is not None:
        valid[:, :P] = cached[3]
    valid = valid.view(B, 1, nb + 1, W)
    fkb = fkb * valid[..., None]  # padding tokens must not enter the linear state
    qb, fqb = query_blocks(q), query_blocks(fq)

    # Query r of a block against key s of the previous key block and of its own: the window is s > r
    # in the previous block and s <= r in its own; the previous block's s <= r are older (linear).
    # Two products per block, not one over a concatenated 2W: no copies, and no linear weights
    # computed for the own block, where they would all be masked out.
    r = torch.arange(W, device=q.device)[:, None]
    s = torch.arange(W, device=q.device)[None, :]
    older = s <= r
    scale = D**-0.5
    scores_prev = (qb @ kb[:, :, :-1].transpose(-1, -2) * scale).masked_fill(~(~older & valid[:, :, :-1, None]),
                                                                             float("-inf"))
    scores_own = (qb @ kb[:, :, 1:].transpose(-1, -2) * scale).masked_fill(~(older & valid[:, :, 1:, None]),
                                                                           float("-inf"))
    c = torch.maximum(scores_prev.amax(-1, keepdim=True), scores_own.amax(-1, keepdim=True))
    if sinks:  # each query against the S sink slots that hold a token up to its own place
        place = torch.arange(nb * W, device=q.device).view(1, 1, nb, W, 1)
        seen = sink_valid.view(B, 1, 1, 1, sinks) & (arrival.view(B, 1, 1, 1, sinks) <= place)
        sink_scores = (qb @ sink_k[:, :, None].transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
        c = torch.maximum(c, sink_scores.amax(-1, keepdim=True))
    c = c.masked_fill(~torch.isfinite(c), 0.0)  # padded queries may see no key at all
    gate = window_gate.to(acc).view(1, H, 1, 1, 1)
    linear_prev = (fqb @ fkb[:, :, :-1].transpose(-1, -2)) * older  # fk is zero where no token is
    if log_decay is not None:  # key s of the previous block is W + r - s places before query r
        linear_prev = linear_prev * powers(log_decay, (W + r - s).clamp(max=2 * W - 1)).view(1, H, 1, W, W)
    out = ((gate * (scores_prev - c).exp() + linear_prev) @ vb[:, :, :-1]
           + (gate * (scores_own - c).exp()) @ vb[:, :, 1:])
    if sinks:
        out = out + (gate * (sink_scores - c).exp()) @ sink_v[:, :, None]

    # Linear state entering query block b: everything in key blocks before b (the carried state is
    # at key block 0's last place, the newest cached token).
    kv0 = (fkb.new_zeros(B, H, fkb.shape[-1], E + 1) if state is None else state.kv.to(acc))
    out = out + decayed_queries(fqb, log_decay) @ entering_states(fkb, vb, kv0, nb, log_decay)

    num, den = out[..., :E], out[..., E:]
    query_valid = torch.arange(nb * W, device=q.device).view(nb, W) < T
    den = den + (~query_valid)[..., None]  # keeps padded rows finite, so their zero gradient stays zero
    y = (num / den).permute(0, 2, 3, 1, 4).reshape(B, nb * W, H, E)[:, :T]

    final = None
    if output_final_state:
        # The sequence ends at W + T (the front padding and cached tokens take the first W places):
        # its last W places become the ring, oldest first (next_slot 0), everything before the state.
        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(B, H, (nb + 1) * W, -1)

        if log_decay is None:
            whole = T // W  # key blocks entirely before place T, then the rest
            kv = (kv0 + (fkb[:, :, :whole].transpose(-1, -2) @ vb[:, :, :whole]).sum(2)
                  + flat(fkb)[:, :, whole * W:T].transpose(-1, -2) @ flat(vb)[:, :, whole * W:T])
        else:  # decayed to the newest token, place W + T - 1
            fk_old = flat(fkb)[:, :, :T] * powers(log_decay, W + T - 1 - torch.arange(T, device=q.device)).view(
                1, H, T, 1)
            kv = (kv0 * powers(log_decay, torch.tensor(T, device=q.device)).view(1, H, 1, 1)
                  + fk_old.transpose(-1, -2) @ flat(vb)[:, :, :T])
        final = HybridState(kv, *(flat(x)[:, :, T:T + W].clone(memory_format=torch.contiguous_format)
                                  for x in (kb, vb, fkb)),
                            valid.reshape(B, (nb + 1) * W)[:, T:T + W].clone(), sink_k, sink_v, sink_valid,
                            torch.zeros(B, dtype=torch.long, device=q.device), 0)
    return y.to(q.dtype), final


def terrace_hybrid_attention(
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
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState | None]:
    """The blocked form of `window_hybrid_attention` with the terrace; query blocks are the document's
    blocks of W, so each sees its own and the previous key block exactly and the older ones linearly."""
    B, T, H, D = q.shape
    W = window
    if state is not None and bool((state.phase != state.phase[0]).any()):
        # Rows at different places in their blocks have different block grids: one row at a time.
        rows = [terrace_hybrid_attention(*(x[b:b + 1] for x in (q, k, v, fq, fk)), window_gate, W,
                                         state_row(state, b), output_final_state, sinks, log_decay) for b in range(B)]
        return torch.cat([y for y, _ in rows]), (stack_states([f for _, f in rows]) if output_final_state else None)
    E = v.shape[-1]
    acc = state_dtype(q.dtype)
    log_decay = None if log_decay is None else log_decay.to(acc)
    p = 0 if state is None else int(state.phase[0])  # the first new token's place in its block
    nb = -(-(p + T) // W)
    back = nb * W - p - T

    # X, the document's last 2W tokens (the ring; padding without a state) then the T new ones. Query
    # block b is document block b of this call, its own keys are key block b + 1 of X[W - p:], and X's
    # W - p oldest tokens, older than every new query's previous block, are linear for all of them.
    def places(new: torch.Tensor, cached: torch.Tensor | None) -> torch.Tensor:
        ring = new.new_zeros(B, 2 * W, H, new.shape[-1], dtype=acc) if cached is None else cached.to(acc)
        return F.pad(torch.cat([ring, new.to(acc)], dim=1), (0, 0, 0, 0, 0, back))

    def key_blocks(x: torch.Tensor) -> torch.Tensor:
        return x[:, W - p:].reshape(B, nb + 1, W, *x.shape[2:]).movedim(3, 1)  # (B, H, nb+1, W, .)

    def query_blocks(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x.to(acc), (0, 0, 0, 0, p, back)).view(B, nb, W, H, -1).permute(0, 3, 1, 2, 4)

    cached = (None, None, None) if state is None else ring_in_time_order(state)
    kx, vx, fkx = (places(x, c) for x, c in zip((k, v, fk), cached))
    vx = torch.cat([vx, torch.ones_like(vx[..., :1])], dim=-1)  # ones column carries the denominator
    sink_k, sink_v, sink_valid, arrival, is_sink = take_sinks(k, v, state, sinks, acc)
    valid = torch.zeros(B, 2 * W + T + back, dtype=torch.bool, device=q.device)
    valid[:, 2 * W:2 * W + T] = ~is_sink  # a sink is attended through its own slot only
    if state is not None:
        valid[:, :2 * W] = cached[3]
    fkx = fkx * valid[:, :, None, None]  # padding tokens must not enter the linear state
    kb, vb, fkb = key_blocks(kx), key_blocks(vx), key_blocks(fkx)
    key_valid = valid[:, W - p:].reshape(B, 1, nb + 1, W)
    qb, fqb = query_blocks(q), query_blocks(fq)

    r = torch.arange(W, device=q.device)[:, None]
    s = torch.arange(W, device=q.device)[None, :]
    scale = D**-0.5
    scores_prev = (qb @ kb[:, :, :-1].transpose(-1, -2) * scale).masked_fill(~key_valid[:, :, :-1, None],
                                                                             float("-inf"))
    scores_own = (qb @ kb[:, :, 1:].transpose(-1, -2) * scale).masked_fill(~((s <= r) & key_valid[:, :, 1:, None]),
                                                                           float("-inf"))
    c = torch.maximum(scores_prev.amax(-1, keepdim=True), scores_own.amax(-1, keepdim=True))
    place = torch.arange(nb * W, device=q.device).view(1, 1, nb, W, 1) - p  # the query's index in this call
    if sinks:
        seen = sink_valid.view(B, 1, 1, 1, sinks) & (arrival.view(B, 1, 1, 1, sinks) <= place)
        sink_scores = (qb @ sink_k[:, :, None].transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
        c = torch.maximum(c, sink_scores.amax(-1, keepdim=True))
    c = c.masked_fill(~torch.isfinite(c), 0.0)  # padded queries may see no key at all
    gate = window_gate.to(acc).view(1, H, 1, 1, 1)
    out = (gate * (scores_prev - c).exp()) @ vb[:, :, :-1] + (gate * (scores_own - c).exp()) @ vb[:, :, 1:]
    if sinks:
        out = out + (gate * (sink_scores - c).exp()) @ sink_v[:, :, None]

    # Linear state entering query block b: the state, X's oldest W - p tokens, and key blocks before b.
    def outer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # sum over tokens of x_t y_t^T
        return torch.einsum("bthf,bthe->bhfe", x, y)

    kv_in = (torch.zeros(B, H, fk.shape[-1], E + 1, dtype=acc, device=q.device) if state is None
             else state.kv.to(acc))
    if log_decay is None:
        kv0 = kv_in if state is None else kv_in + outer(fkx[:, :W - p], vx[:, :W - p])
    else:  # X's oldest W - p tokens join at key block 0's last place (X place 2W - p - 1); the carried
        # kv_in (at X place 2W - 1, query i + 1 places later) on its own: moving it back would take gamma^-p
        oldest = powers(log_decay, 2 * W - p - 1 - torch.arange(W - p, device=q.device))
        kv0 = outer(fkx[:, :W - p] * oldest.T[None, :, :, None], vx[:, :W - p])
        if state is not None:
            out = out + (fqb * powers(log_decay, (place + 1).clamp(min=0)).view(1, H, nb, W, 1)) @ kv_in[:, :, None]
    out = out + decayed_queries(fqb, log_decay) @ entering_states(fkb, vb, kv0, nb, log_decay)

    num, den = out[..., :E], out[..., E:]
    den = den + ((place < 0) | (place >= T)).view(1, 1, nb, W, 1)  # keeps padded rows finite
    y = (num / den).permute(0, 2, 3, 1, 4).reshape(B, nb * W, H, E)[:, p:p + T]

    final = None
    if output_final_state:  # the ring is X's last 2W tokens, oldest first; the state holds all before
        ring = (x[:, T:T + 2 * W].transpose(1, 2).clone(memory_format=torch.contiguous_format)
                for x in (kx, vx, fkx))
        fk_old = fkx[:, :T]
        if log_decay is not None:  # decayed to the newest token, X place 2W + T - 1
            fk_old = fk_old * powers(log_decay, 2 * W + T - 1 - torch.arange(T, device=q.device)).T[None, :, :, None]
            kv_in = kv_in * powers(log_decay, torch.tensor(T, device=q.device)).view(1, H, 1, 1)
        final = HybridState(kv_in + outer(fk_old, vx[:, :T]), *ring, valid[:, T:T + 2 * W].clone(), sink_k,
                            sink_v, sink_valid, torch.full((B,), (p + T) % W, device=q.device), 0, True)
    return y.to(q.dtype), final


def ring_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_gate: torch.Tensor,
    state: HybridState,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """One new token per row: q, k (B, H, D), v (B, H, V), fq, fk (B, H, F); the state's tensors
    are updated in place (the returned state differs only in next_slot). Returns y (B, H, V).
    log_decay: the decay the state was made with (module docstring). A state with a sparse cache has
    had its block decided first (`dispatch.window_hybrid_step`)."""
    B, H, D = q.shape
    E = v.shape[-1]
    Fd = fk.shape[-1]
    S = state.sink_k.shape[2]
    slot = state.next_slot
    ring = state.k.shape[2]
    acc = state.kv.dtype
    # The oldest token leaves the ring: into the linear state (zero fk if it is no token).
    leaving = state.fk[:, :, slot]
    if log_decay is not None:  # the state moves to the new token's place; the leaving token is `ring` before it
        log_decay = log_decay.to(acc)
        state.kv.mul_(log_decay.exp().view(1, H, 1, 1))
        if state.cache_age is not None:  # the cache's pairs are one place further from the newest token
            state.cache_age.add_(1)
        leaving = leaving * (log_decay * ring).exp().view(1, H, 1)
    state.kv.view(B * H, Fd, E + 1).baddbmm_(leaving.reshape(B * H, Fd, 1),
                                             state.v[:, :, slot].reshape(B * H, 1, E + 1))
    state.k[:, :, slot] = k
    state.v[:, :, slot, :E] = v
    if S and not bool(state.sink_valid.all()):  # a token among its document's first S goes to a sink slot
        held = state.sink_valid.sum(-1)
        joining = torch.nn.functional.one_hot(held.clamp(max=S - 1), S).bool() & (held < S)[:, None]
        state.sink_k.copy_(torch.where(joining[:, None, :, None], k.to(acc)[:, :, None], state.sink_k))
        state.sink_v[..., :E] = torch.where(joining[:, None, :, None], v.to(acc)[:, :, None], state.sink_v[..., :E])
        state.sink_valid.logical_or_(joining)
        in_ring = held >= S
        state.fk[:, :, slot] = fk * in_ring.view(B, 1, 1)
        state.valid[:, slot] = in_ring
    else:
        state.fk[:, :, slot] = fk
        state.valid[:, slot] = True
    keys, values, present = state.k, state.v, state.valid
    two_blocks = state.terrace or state.cache_k is not None  # a ring of 2W tokens in document blocks of W
    if two_blocks:  # softmax over the newest W + phase + 1 tokens (terrace) or W; the ring's older ones are linear
        age = (slot - torch.arange(ring, device=q.device)) % ring
        phase = state.phase[:, None]
        inside = age <= ring // 2 + phase if state.terrace else (age < ring // 2).expand(B, -1)  # (B, 2W)
        previous_block = (age > phase) & (age <= ring // 2 + phase)
        present = present & inside
        state.phase.add_(1).remainder_(ring // 2)
    present = present[:, None]  # (B, 1, R); per head (B, H, C + R) with the cache
    if state.cache_k is not None:  # the cache's pairs are attended exactly, in the same softmax
        groups = state.cache_rule.groups
        keys = torch.cat([per_head(state.cache_k, groups), keys], dim=2)
        values = torch.cat([per_head(state.cache_v, groups), values], dim=2)
        present = torch.cat([per_head(state.cache_valid, groups), present.expand(-1, H, -1)], dim=2)
    if S:
        keys, values = torch.cat([state.sink_k, keys], dim=2), torch.cat([state.sink_v, values], dim=2)
        present = torch.cat([state.sink_valid[:, None].expand(-1, present.shape[1], -1), present], dim=2)
    scores = (keys @ q.to(acc).unsqueeze(-1)).squeeze(-1) * D**-0.5  # (B, H, S + C + R)
    scores = scores.masked_fill_(~present, float("-inf"))
    weights = (scores - scores.amax(-1, keepdim=True)).exp_() * window_gate.to(acc).view(1, H, 1)
    if two_blocks:
        linear = (state.fk @ fq.to(acc).unsqueeze(-1)).squeeze(-1) * ~inside[:, None]  # fk is 0 where no token
        if log_decay is not None:
            linear = linear * powers(log_decay, age)
        weights[..., -ring:] += linear
    out = (weights.unsqueeze(2) @ values).add_(fq.to(acc).unsqueeze(2) @ state.kv).squeeze(2)
    if state.cache_seen is not None:  # the cache's next choice is scored by these shares (sparse_cache.py)
        shares = weights / out[..., E:]
        C = state.cache_seen.shape[2]
        state.cache_seen.add_(shares[..., S:S + C])
        state.ring_seen.add_(shares[..., S + C:] * previous_block[:, None])
    y = out[..., :E] / out[..., E:]
    return y.to(q.dtype), state._replace(next_slot=(slot + 1) % ring)


def parallel_window_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_gate: torch.Tensor,
    window: int = 64,
    sinks: int = 0,
    terrace: bool = False,
    log_decay: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition with full T x T masks, for tests and for short sequences."""
    T, D = q.shape[1], q.shape[-1]
    acc = state_dtype(q.dtype)
    qf, kf, vf, fqf, fkf = (x.to(acc).transpose(1, 2) for x in (q, k, v, fq, fk))
    n = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    sink = j < sinks
    first = (n // window - 1) * window if terrace else n - window + 1
    soft = (j <= n) & ((j >= first) | sink)
    older = (j < first) & ~sink
    scores = (qf @ kf.transpose(-1, -2) * D**-0.5).masked_fill(~soft, float("-inf"))
    gate = window_gate.to(acc).view(1, -1, 1, 1)
    linear = (fqf @ fkf.transpose(-1, -2)) * older
    if log_decay is not None:
        linear = linear * powers(log_decay.to(acc), (n - j).clamp(min=0))
    weights = gate * (scores - scores.amax(-1, keepdim=True)).exp() + linear
    y = (weights @ vf) / weights.sum(-1, keepdim=True)
    return y.transpose(1, 2).to(q.dtype)
