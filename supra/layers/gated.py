"""Gated students: a decay that depends on the token (GLA) and the gated delta rule (GDN).

Both reuse the pretrained q/k/v/o. The per-token, per-head log decay comes from one of two gates
(`spec.gate`):
  key:     Liger's parameter-free gate (arXiv 2503.01496): log a_t = logsigmoid(mean of the key head k_t) / 16, built
           from the pretrained key projection (Liger pools the key; our kernels take one decay per
           head, so the pool is over the whole head).
  learned: log a_t = logsigmoid(x_t W + b), with W = 0 and b = logit of the fixed per-head rates of
           `spec.decay` at conversion: the layer starts as SUPRA's fixed decay and training makes it
           depend on the token. x_t is the query projection of the layer input (for the square W_q of
           Llama-style models, a linear function of the input of the same rank).

GLA (`method=gla`): normalised linear attention over Hedgehog features after RoPE, both numerator and
denominator decayed by the gate; with `window > 0` (default 64) mixed per head with an exact
sliding-window softmax (Liger Attention: 0.5 x window softmax + 0.5 x gated linear; our mix is a
learnable per-head weight starting at 0.5). With `window_mix=token` the weight is
sigmoid(m_h + x_t W_mix) with W_mix = 0 at conversion: each token can lean on the window or on the
recurrent state, as the LoLCATs hybrid's shared denominator lets each query do.

With `cache_budget` > 0 (gla, gdn with a window) the window's softmax also attends a LoLA-style sparse
cache of older pairs (kernels/sparse_cache.py), chosen as for LoLCATs: runs the last block attended most,
and a share `cache_recall` of them the runs a linear memory of the evicted tokens recalls worst. That
memory is not the gated state (the window's kernel does not see it) but a normalised linear attention
over the tokens that left the window, with the layer's own nonnegative key features: GLA's Hedgehog
features; for GDN Hedgehog's form without weights, [softmax(x), softmax(-x)] with x its unit key times
sqrt(head_dim). It only chooses: the output is share x softmax(window + sinks + cache) + (1 - share) x
the gated state, which itself keeps every token.

GDN (`method=gdn`): the gated delta rule (kernels/delta_rule.py) on L2-normalised q and k (after RoPE
and an identity-initialised per-head map each), with beta_t = sigmoid(x_t W_beta + b_beta) from a new
projection (W_beta = 0, so beta starts at 0.5); with `window > 0` mixed with the same sliding-window
softmax as GLA. Untrained, pure GDN (window=0) has none of the teacher's peaked softmax weights
(nothing divides by a sum of exponentials), so the window is what keeps a converted model usable.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (
    HybridState,
    delta_rule,
    delta_rule_step,
    stack_states,
    window_hybrid_attention,
    window_hybrid_step,
)
from .attention import (
    RecurrentAttention,
    at_least_float32,
    documents_restart,
    pack_documents,
    per_document_rows,
    repeat_heads,
    restart_hybrid_rows,
    restarting_rows,
    rotate,
    stepping,
)
from .feature_maps import HeadwiseLinear, HedgehogFeatureMap, log_decay_rates

KEY_GATE_NORMALIZER = 16.0  # Liger's gate_logit_normalizer: keeps the key gate's decays near 1


class GatedState(NamedTuple):
    window: HybridState | None  # the sliding-window softmax's last tokens (None without a window)
    recurrent: torch.Tensor  # GLA: (B, H, F, V + 1), the last column is the denominator; GDN: (B, H, K, V)


class DecayGate(nn.Module):
    """Per-token, per-head log decay (B, T, H) from the layer's q and k (see the module docstring)."""

    def __init__(self, kind: str, decay: str, heads: int, head_dim: int, groups: int, **factory):
        super().__init__()
        self.groups = groups
        self.proj = None
        if kind == "learned":
            rates = torch.tensor(log_decay_rates(decay, heads), dtype=torch.float64).exp()
            self.proj = nn.Linear(heads * head_dim, heads, **factory)
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.bias.copy_(torch.logit(rates))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            gate = F.logsigmoid(at_least_float32(k).mean(-1)) / KEY_GATE_NORMALIZER
            return repeat_heads(gate[..., None], self.groups)[..., 0]
        return F.logsigmoid(at_least_float32(self.proj(q.flatten(2))))


class GatedAttention(RecurrentAttention):
    """Shared by GLA and GDN: the decay gate, and the optional sliding-window softmax mixed in per head."""

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, spec: Any):
        super().__init__(attention, config, layer_idx, spec)
        self.gate = DecayGate(spec.gate, spec.decay, self.num_heads, self.head_dim, self.groups, **self.factory())
        self.window_mix = (nn.Parameter(torch.zeros(self.num_heads, **self.factory())) if spec.window > 0
                           else None)
        self.mix_proj = None
        if spec.window > 0 and spec.window_mix == "token":
            self.mix_proj = nn.Linear(self.num_heads * self.head_dim, self.num_heads, bias=False, **self.factory())
            nn.init.zeros_(self.mix_proj.weight)

    def window_share(self, q: torch.Tensor) -> torch.Tensor:
        """The window softmax's weight in the mix: (H, 1), or (B, T, H, 1) per token; q before RoPE."""
        logit = self.window_mix.float()[:, None]
        if self.mix_proj is not None:
            logit = logit + at_least_float32(self.mix_proj(q.flatten(2)))[..., None]
        return torch.sigmoid(logit)

    def mix_window(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   share: torch.Tensor | None, state: GatedState | None, starts: torch.Tensor | None,
                   want_state: bool, recurrent_state: torch.Tensor | None,
                   recall_keys: torch.Tensor | None) -> tuple[torch.Tensor, GatedState | None]:
        """share x window softmax + (1 - share) x `out`; q, k after RoPE, share from `window_share`;
        recall_keys (B, T, H, F) >= 0: what the sparse cache's recall share is scored with (module
        docstring; needed only with one)."""
        window_state = None
        if self.window_mix is not None:
            # The LoLCATs hybrid with zero query features is exactly a softmax over the window, sinks and
            # cache (and keeps its state); its key features only feed the cache's recall memory.
            cache = self.spec.cache_arguments(self.groups)
            fk = recall_keys if cache["cache_recall"] else q.new_zeros(*q.shape[:3], 1)
            none = torch.zeros_like(fk)
            ones = torch.ones(self.num_heads, device=q.device)

            def window(q, k, v, fq, fk, state):
                return window_hybrid_attention(q, k, v, fq, fk, ones, self.spec.window, state, want_state,
                                               backend=self.spec.backend, sinks=self.spec.sinks,
                                               terrace=self.spec.window_kind == "terrace", **cache)

            carried = None if state is None else state.window
            if stepping(q, carried):
                restart = restarting_rows(starts)
                if restart is not None:
                    carried = restart_hybrid_rows(carried, restart)
                local, window_state = window_hybrid_step(q[:, 0], k[:, 0], v[:, 0], none[:, 0], fk[:, 0], ones,
                                                         carried)
                local = local.unsqueeze(1)
            else:
                local, window_state = per_document_rows(window, (q, k, v, none, fk), carried, starts,
                                                        stack_states)
            out = share * at_least_float32(local) + (1 - share) * at_least_float32(out)
        return out, (GatedState(window_state, recurrent_state) if want_state else None)


class GlaAttention(GatedAttention):
    """Gated linear attention (+ an optional sliding-window softmax); see the module docstring."""

    new_parameter_prefixes = ("feature_map_q", "feature_map_k", "gate", "window_mix", "mix_proj")
    eps = 1e-6

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, spec: Any):
        super().__init__(attention, config, layer_idx, spec)
        dim = spec.feature_dim or self.head_dim
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim, dim, **self.factory())
        self.feature_map_k = HedgehogFeatureMap(self.num_heads, self.head_dim, dim, **self.factory())

    def mix(self, q, k, v, position_embeddings, state, starts, want_state):
        log_decay = self.gate(q, k)
        share = self.window_share(q) if self.window_mix is not None else None
        cos, sin = position_embeddings
        q = rotate(q, cos, sin)
        k = repeat_heads(rotate(k, cos, sin), self.groups)
        v = repeat_heads(v, self.groups)
        v_and_one = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # last column: the denominator
        fk = self.feature_map_k(k)
        linear, linear_state = self.linear_mix(self.feature_map_q(q), fk, v_and_one, log_decay,
                                               1.0, None if state is None else state.recurrent, starts, want_state)
        linear = at_least_float32(linear)
        out = linear[..., :-1] / linear[..., -1:].clamp_min(self.eps)
        return self.mix_window(out, q, k, v, share, state, starts, want_state, linear_state, fk)


class GatedDeltaAttention(GatedAttention):
    """Gated DeltaNet student (+ an optional sliding-window softmax); see the module docstring."""

    new_parameter_prefixes = ("feature_map_q", "feature_map_k", "gate", "beta_proj", "window_mix", "mix_proj")

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, spec: Any):
        super().__init__(attention, config, layer_idx, spec)
        # Identity-initialised maps before the L2 norm: what attention transfer trains besides the gates.
        self.feature_map_q = HeadwiseLinear(self.num_heads, self.head_dim, self.head_dim, bias=False,
                                            identity_init=True, **self.factory())
        self.feature_map_k = HeadwiseLinear(self.num_heads, self.head_dim, self.head_dim, bias=False,
                                            identity_init=True, **self.factory())
        self.beta_proj = nn.Linear(self.num_heads * self.head_dim, self.num_heads, **self.factory())
        with torch.no_grad():
            self.beta_proj.weight.zero_()
            self.beta_proj.bias.zero_()

    def mix(self, q, k, v, position_embeddings, state, starts, want_state):
        log_decay = self.gate(q, k)
        beta = torch.sigmoid(at_least_float32(self.beta_proj(q.flatten(2))))
        share = self.window_share(q) if self.window_mix is not None else None
        cos, sin = position_embeddings
        q = rotate(q, cos, sin)
        k = repeat_heads(rotate(k, cos, sin), self.groups)
        v = repeat_heads(v, self.groups)
        fq = F.normalize(at_least_float32(self.feature_map_q(q)), dim=-1)
        fk = F.normalize(at_least_float32(self.feature_map_k(k)), dim=-1)
        out, delta_state = self.delta_mix(fq, fk, v, beta, log_decay, None if state is None else state.recurrent,
                                          starts, want_state)
        recall_keys = None
        if self.spec.cache_arguments(self.groups)["cache_recall"]:  # only a cache's recall share reads them
            scaled = fk * self.head_dim**0.5
            recall_keys = torch.cat([scaled.softmax(-1), (-scaled).softmax(-1)], dim=-1)
        return self.mix_window(out, q, k, v, share, state, starts, want_state, delta_state, recall_keys)

    def delta_mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                  log_decay: torch.Tensor, state: torch.Tensor | None, starts: torch.Tensor | None,
                  want_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The delta rule over rows that may hold several documents: packed into one varlen row, as
        `linear_mix` packs linear attention."""
        backend = self.spec.backend
        if stepping(q, state):
            restart = restarting_rows(starts)
            if restart is not None:
                state.mul_(~restart.view(-1, 1, 1, 1))
            out = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], state, log_decay[:, 0], 1.0)
            return out.unsqueeze(1), state
        if not documents_restart(starts, state):
            return delta_rule(q, k, v, beta, log_decay, 1.0, state, want_state, backend=backend)

        def packed(tensors, initial, cu_seqlens):
            return delta_rule(*tensors, 1.0, initial, want_state, cu_seqlens=cu_seqlens, backend=backend)

        return pack_documents(packed, (q, k, v, beta, log_decay), state, starts, (q.shape[2], q.shape[3], v.shape[-1]),
                              q.dtype, want_state)

