"""Recurrent attention layers that replace a decoder layer's softmax self-attention in place.

Each layer reuses the pretrained q/k/v/o projections (same parameter names, so the rest of the
checkpoint is untouched) and adds only its feature maps. The sequence mixing is one call into
`supra.kernels`: chunked on the whole prompt, or continued from a carried state, which is what
makes chunked prefill followed by token-by-token decoding exact.

Documents packed into one row restart wherever `position_ids == 0`. The same rule handles left
padding in `generate()`: the first real token has position 0, so the pads before it never reach the
state that decoding continues from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (
    HybridState,
    linear_attention,
    linear_attention_step,
    stack_states,
    state_row,
    window_hybrid_attention,
    window_hybrid_step,
)
from .cache import handed_cache, recurrent_slot
from .feature_maps import HedgehogFeatureMap, ReluFeatureMap, dense_relu_map, log_decay_rates


@dataclass(frozen=True)
class TransferMode:
    """A converted layer in attention transfer (LoLCATs stage 1; set by supra.train.transfer): it
    computes the softmax attention it replaced on its own inputs and passes that on (teacher
    forcing). With `score`, it also computes its own output: score(its transfer_mse to the softmax
    output, the softmax output) records the loss (it may run its backward at once, so one layer's
    graph is alive at a time) and returns the output to pass on."""

    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def transfer_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Attention transfer's per-layer loss: MSE of the layer's output to the softmax output it
    replaces, in float32. The training loops scale it (supra.train.transfer)."""
    return F.mse_loss(student.float(), teacher.float())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, T, H, D) with HF's cos/sin of shape (B, T, D) (rotate-half convention)."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Normalisations run in float32 for bf16 activations, and stay float64 in float64 tests."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: (B, T, H_kv, D) -> (B, T, H_kv * groups, D)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def softmax_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor], starts: torch.Tensor | None,
                  groups: int) -> torch.Tensor:
    """The original layer's causal softmax attention per head (B, T, H, D), before o_proj; documents
    packed into a row attend only within themselves."""
    cos, sin = position_embeddings
    q, k = rotate(q, cos, sin), repeat_heads(rotate(k, cos, sin), groups)
    v = repeat_heads(v, groups)
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if starts is not None and starts[:, 1:].any():
        document = starts.long().cumsum(-1)
        mask = mask & (document[:, :, None] == document[:, None, :])[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def document_starts(position_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if position_ids is None:
        return None
    return (position_ids == 0).expand(batch, -1)


def stepping(q: torch.Tensor, state: Any) -> bool:
    """Whether this call is a decode step: one new token continuing a state, outside autograd (the
    step forms update the state in place, which a backward through the previous state would not
    survive). Subclasses call it in `mix` to take their one-token path."""
    return q.shape[1] == 1 and state is not None and not torch.is_grad_enabled()


def restarting_rows(starts: torch.Tensor | None) -> torch.Tensor | None:
    """Rows (B,) whose one new token starts a document (position 0): their state must not carry over."""
    if starts is None or not bool(starts[:, 0].any()):
        return None
    return starts[:, 0]


def documents_restart(starts: torch.Tensor | None, state: Any) -> bool:
    """Whether a document starts inside a row, or at its first token while a state is carried in:
    then the rows cannot run as one batched call."""
    return starts is not None and bool(starts[:, 1:].any() or (state is not None and starts[:, 0].any()))


def pack_documents(op: Callable, tensors: tuple[torch.Tensor, ...], state: torch.Tensor | None,
                   starts: torch.Tensor, state_shape: tuple[int, ...], state_dtype: torch.dtype,
                   want_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows whose documents restart inside them (packed training, left padding) run as one varlen
    row (B=1, cu_seqlens): `op(packed tensors, initial states, cu_seqlens) -> (out, final states)`.
    A row's first document continues the carried state unless it starts at position 0; the state
    returned per row is that of its last document."""
    B, T = starts.shape
    flat = starts.clone()
    flat[:, 0] = True
    doc_start = flat.flatten().nonzero().squeeze(1)
    cu_seqlens = torch.cat([doc_start, doc_start.new_tensor([B * T])])
    initial = torch.zeros(len(doc_start), *state_shape, device=starts.device, dtype=state_dtype)
    if state is not None:
        carries = (doc_start % T == 0) & ~starts.flatten()[doc_start]
        initial[carries] = state[(doc_start // T)[carries]].to(state_dtype)
    out, final = op(tuple(x.reshape(1, B * T, *x.shape[2:]) for x in tensors), initial, cu_seqlens)
    if want_state:
        final = final[torch.searchsorted(doc_start, torch.arange(1, B + 1, device=starts.device) * T) - 1]
    return out.view(B, T, *out.shape[2:]), final


class RecurrentAttention(nn.Module):
    """Shared plumbing: projections, cache slot, output projection. Subclasses implement
    `mix(q, k, v, position_embeddings, state, starts, want_state) -> (out, state)`; when
    `stepping(q, state)` it is a decode step, which `linear_mix` turns into one recurrent step."""

    new_parameter_prefixes: tuple[str, ...] = ()

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, spec: Any):
        super().__init__()
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.layer_idx = layer_idx
        self.spec = spec
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.transfer: TransferMode | None = None  # None: the layer's own attention

    def factory(self) -> dict:
        weight = next(self.q_proj.parameters())  # q_proj may be factorized (no .weight)
        return {"device": weight.device, "dtype": weight.dtype}

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        cache = handed_cache(cache, past_key_values, kwargs, f"layer {self.layer_idx}'s attention")
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        starts = document_starts(position_ids, B)
        if self.transfer is not None:
            return self.o_proj(self.attention_transfer(q, k, v, position_embeddings, starts)), None
        slot = recurrent_slot(cache, self.layer_idx) if cache is not None else None
        out, state = self.mix(q, k, v, position_embeddings, slot.state if slot is not None else None,
                              starts, want_state=slot is not None)
        if slot is not None:
            slot.advance(state, T)
        return self.o_proj(out.reshape(B, T, -1).to(hidden_states.dtype)), None

    def attention_transfer(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor],
                           starts: torch.Tensor | None) -> torch.Tensor:
        """The layer in its `TransferMode`: the softmax attention it replaces, on the same inputs, is
        what it passes on; scoring, its own output's MSE to it goes to `score` as well."""
        B, T = q.shape[:2]
        with torch.no_grad():
            teacher = softmax_heads(q, k, v, position_embeddings, starts, self.groups)
        if self.transfer.score is None:  # the teacher: only the inputs of later layers are wanted
            return teacher.reshape(B, T, -1).to(q.dtype)
        with torch.enable_grad():
            student, _ = self.mix(q, k, v, position_embeddings, None, starts, want_state=False)
            return self.transfer.score(transfer_mse(student, teacher), teacher.reshape(B, T, -1).to(q.dtype))

    def linear_mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
                   scale: float, state: torch.Tensor | None, starts: torch.Tensor | None,
                   want_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decayed linear attention over rows that may hold several documents, one kernel call;
        a decode step updates `state` in place through `linear_attention_step`."""
        backend = self.spec.backend
        if stepping(q, state):
            restart = restarting_rows(starts)
            if restart is not None:
                state.mul_(~restart.view(-1, 1, 1, 1))
            if log_decay is not None and log_decay.dim() == 3:  # per token (B, 1, H)
                log_decay = log_decay[:, 0]
            out = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, log_decay, scale, backend=backend)
            return out.unsqueeze(1), state
        if not documents_restart(starts, state):
            return linear_attention(q, k, v, log_decay, scale, state, want_state, backend=backend)
        per_token = log_decay is not None and log_decay.dim() == 3  # (B, T, H): packed like the tokens

        def packed(tensors, initial, cu_seqlens):
            return linear_attention(*tensors[:3], tensors[3] if per_token else log_decay, scale, initial, want_state,
                                    cu_seqlens=cu_seqlens, backend=backend)

        state_shape = (q.shape[2], q.shape[3], v.shape[-1])
        state_dtype = torch.float32 if state is None else state.dtype  # float64 stays float64
        return pack_documents(packed, (q, k, v, log_decay) if per_token else (q, k, v), state, starts,
                              state_shape, state_dtype, want_state)


class SupraAttention(RecurrentAttention):
    """SUPRA: y = GroupNorm(sum_j gamma^(i-j) <RoPE(phi(q_i)), RoPE(phi(k_j))> v_j / sqrt(d)),
    phi = ReLU(dense Linear); one map shared by q and k unless keys have fewer heads (GQA)."""

    new_parameter_prefixes = ("feature_map_q", "feature_map_k")

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, spec: Any):
        super().__init__(attention, config, layer_idx, spec)
        identity = spec.feature_map_init == "identity"
        self.feature_map_q = dense_relu_map(self.num_heads * self.head_dim, identity, **self.factory())
        self.feature_map_k = (None if self.groups == 1
                              else dense_relu_map(self.num_kv_heads * self.head_dim, identity, **self.factory()))
        # Plain floats, not a buffer: model.to(bfloat16) must not round the decay. The float32 tensor
        # is made once per device, not on every call.
        self.log_decay_values = log_decay_rates(spec.decay, self.num_heads)
        self._log_decay: torch.Tensor | None = None

    def log_decay(self, device: torch.device) -> torch.Tensor:
        if self._log_decay is None or self._log_decay.device != device:
            self._log_decay = torch.tensor(self.log_decay_values, device=device, dtype=torch.float32)
        return self._log_decay

    def mix(self, q, k, v, position_embeddings, state, starts, want_state):
        B, T = q.shape[:2]
        k_map = self.feature_map_k or self.feature_map_q
        fq = torch.relu(self.feature_map_q(q.reshape(B, T, -1))).view_as(q)
        fk = torch.relu(k_map(k.reshape(B, T, -1))).view_as(k)
        cos, sin = position_embeddings
        fq, fk = rotate(fq, cos, sin), repeat_heads(rotate(fk, cos, sin), self.groups)
        out, state = self.linear_mix(fq, fk, repeat_heads(v, self.groups), self.log_decay(q.device),
                                     self.head_dim**-0.5,
                                     state, starts, want_state)
        # GroupNorm with one group per head and no affine replaces the softmax denominator.
        return F.layer_norm(at_least_float32(out), (out.shape[-1],), eps=1e-5), state


class T2RAttention(RecurrentAttention):
    """T2R baseline: phi = ReLU(W x + b) per head after RoPE, normalised linear attention, no decay."""

    new_parameter_prefixes = ("feature_map_q", "feature_map_k")
    eps = 1e-6

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, spec: Any):
        super().__init__(attention, config, layer_idx, spec)
        identity = spec.feature_map_init == "identity"
        dim = spec.feature_dim or self.head_dim
        self.feature_map_q = ReluFeatureMap(self.num_heads, self.head_dim, dim, identity, **self.factory())
        self.feature_map_k = ReluFeatureMap(self.num_heads, self.head_dim, dim, identity, **self.factory())

    def mix(self, q, k, v, position_embeddings, state, starts, want_state):
        cos, sin = position_embeddings
        fq = self.feature_map_q(rotate(q, cos, sin))
        fk = self.feature_map_k(repeat_heads(rotate(k, cos, sin), self.groups))
        v = repeat_heads(v, self.groups)
        v_and_one = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # last column: the denominator
        out, state = self.linear_mix(fq, fk, v_and_one, None, 1.0, state, starts, want_state)
        out = at_least_float32(out)
        return out[..., :-1] / out[..., -1:].clamp_min(self.eps), state


class LolcatsAttention(RecurrentAttention):
    """LoLCATs: Hedgehog feature maps after RoPE; exact softmax over a sliding window and linear
    attention for older tokens, one shared denominator, learnable per-head window gate; with
    spec.state_decay, the linear part decays per head (kernels/hybrid.py), fixed or learned."""

    new_parameter_prefixes = ("feature_map_q", "feature_map_k", "window_factor", "state_decay")

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, spec: Any):
        super().__init__(attention, config, layer_idx, spec)
        dim = spec.feature_dim or self.head_dim
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim, dim, **self.factory())
        self.feature_map_k = HedgehogFeatureMap(self.num_heads, self.head_dim, dim, **self.factory())
        # sigmoid(-2.197) = 0.1: the softmax window starts with a small weight, as in LoLCATs.
        self.window_factor = nn.Parameter(torch.full((self.num_heads,), -2.1972245773362196, **self.factory()))
        # The linear part's decay (kernels/hybrid.py): fixed rates as plain floats (SupraAttention's
        # reason), or learned as the logit of gamma, starting at SUPRA's rates.
        kind = spec.state_decay
        self.log_decay_values = log_decay_rates("supra" if kind == "learned" else kind, self.num_heads)
        self._log_decay: torch.Tensor | None = None
        self.state_decay = (nn.Parameter(torch.tensor(self.log_decay_values, dtype=torch.float64).exp().logit()
                                         .to(**self.factory())) if kind == "learned" else None)

    def log_decay(self, device: torch.device) -> torch.Tensor | None:
        """The linear part's log gamma per head (H,), None without decay."""
        if self.state_decay is not None:
            return F.logsigmoid(self.state_decay.float())
        if self.spec.state_decay == "none":
            return None
        if self._log_decay is None or self._log_decay.device != device:
            self._log_decay = torch.tensor(self.log_decay_values, device=device, dtype=torch.float32)
        return self._log_decay

    def hybrid_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What the hybrid computes with, from the projections: rotated q, k and v (one per query
        head), the feature maps fq, fk, the window gate (H,) and the linear part's log decay (or None)."""
        cos, sin = position_embeddings
        q = rotate(q, cos, sin)
        k = repeat_heads(rotate(k, cos, sin), self.groups)
        v = repeat_heads(v, self.groups)
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        return q, k, v, fq, fk, torch.sigmoid(self.window_factor.float()), self.log_decay(q.device)

    def mix(self, q, k, v, position_embeddings, state, starts, want_state):
        q, k, v, fq, fk, gate, log_decay = self.hybrid_inputs(q, k, v, position_embeddings)
        if stepping(q, state):
            restart = restarting_rows(starts)
            if restart is not None:
                state = restart_hybrid_rows(state, restart)
            out, state = window_hybrid_step(q[:, 0], k[:, 0], v[:, 0], fq[:, 0], fk[:, 0], gate, state, log_decay)
            return out.unsqueeze(1), state

        def hybrid(q, k, v, fq, fk, state):
            return window_hybrid_attention(q, k, v, fq, fk, gate, self.spec.window, state, want_state,
                                           backend=self.spec.backend, sinks=self.spec.sinks,
                                           terrace=self.spec.window_kind == "terrace", log_decay=log_decay,
                                           **self.spec.cache_arguments(self.groups))

        return per_document_rows(hybrid, (q, k, v, fq, fk), state, starts, stack_states)


def per_document_rows(op: Callable, tensors: tuple[torch.Tensor, ...], state: Any, starts: torch.Tensor | None,
                 merge: Callable) -> tuple[torch.Tensor, Any]:
    """Run `op(*tensors, state)` separately on each document of each row when documents restart
    inside rows (packed training, left padding); one batched call otherwise."""
    if not documents_restart(starts, state):
        return op(*tensors, state)
    B, T = starts.shape
    outs, finals = [], []
    for b in range(B):
        bounds = [0, *(t for t in starts[b, 1:].nonzero().squeeze(1).add(1).tolist()), T]
        row_state = None if state is None or starts[b, 0] else state_row(state, b)
        row_outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            out, row_state = op(*(x[b:b + 1, s:e] for x in tensors), row_state if s == 0 else None)
            row_outs.append(out)
        outs.append(torch.cat(row_outs, dim=1))
        finals.append(row_state)
    return torch.cat(outs), (merge(finals) if finals[0] is not None else None)


def restart_hybrid_rows(state: HybridState, rows: torch.Tensor) -> HybridState:
    """Empty the state of `rows` (B,) in place: no linear state, no token in the window."""
    keep = ~rows
    state.kv.mul_(keep.view(-1, 1, 1, 1))
    state.fk.mul_(keep.view(-1, 1, 1, 1))
    state.valid.logical_and_(keep[:, None])
    state.sink_valid.logical_and_(keep[:, None])
    state.phase.mul_(keep)
    if state.cache_valid is not None:
        state.cache_valid.logical_and_(keep[:, None, None])
        state.cache_seen.mul_(keep.view(-1, 1, 1))
        state.ring_seen.mul_(keep.view(-1, 1, 1))
    return state
