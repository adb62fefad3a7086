"""A decoding step for Llama-family models on a CPU with the weights packed once per generation.

A decoding step runs every weight once against one new token per row. Through transformers' forward, on a 2-core
CPU with 16 rows, a step of the embedded model took 68 ms, of which its 211 matrix products took 26 ms and the rest
went to some 5,000 small operator calls: autocast's casts of each layer's input and of the whole key cache, the
cache's concatenation per layer, rotary embeddings rebuilt per layer (benchmarks/NOTES.md, change 14). This module
runs the same arithmetic with less around it:

- the q, k and v projections are one product, and so are the gate and up projections (weights concatenated along
  the output axis: the same dot products, fewer and larger calls);
- the weights are packed once per generation in oneDNN's own layout (``torch.ops.mkldnn._reorder_linear_weight``,
  the kernel torch's inductor uses on CPUs), cast to bfloat16 first under bfloat16 autocast: a (16, 576) x
  (576, 1536) bfloat16 product takes 35 us instead of 71 us on an Intel Xeon with AMX; in float32 on an AMD EPYC
  without AVX512 a 16-row decoding step takes 97.5 ms instead of 150.6 ms through ``F.linear``
  (``benchmarks/decoder_fp32.py``; benchmarks/NOTES.md, changes 14 and 20);
- a prompt's keys and values are kept once for its G completions, not copied to each: attention stacks the G rows'
  queries into one product against them, so a step reads each prompt's cache once (benchmarks/NOTES.md, change 22);
  the decoded tokens' keys and values live in one preallocated float32 buffer per generation, written in place: no
  concatenation and no cast of the whole cache per step.

Per layer, for the A active rows (h: (A, D) the residual stream, in the model's float32 under autocast):

    x = RMSNorm(h);  q, k, v = x W_qkv;  q, k = rope(q), rope(k);  K[:, t], V[:, t] = k, v
    h = h + softmax(q [K_prompt, K]^T / sqrt(d) + mask) [V_prompt, V] W_o
    h = h + (silu(RMSNorm(h) W_gate) * RMSNorm(h) W_up) W_down

with each tensor in the dtype transformers gives it under the same autocast (products in bfloat16, attention on
bfloat16 queries, keys and values summed in float32 as SDPA's CPU kernel sums them, the residual stream, norms and
rotary embeddings in float32), so the sampled policy is the one the transformers path
samples, up to the order of floating-point sums. Which models qualify: :func:`unsupported` says why one does not,
and :func:`policygrad.lm.rollout.generate` then uses the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PackedDecoder", "unsupported"]


def unsupported(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why :class:`PackedDecoder` cannot decode ``model`` on ``device`` under autocast to ``dtype`` (None: it can)."""
    if device.type != "cpu":
        return f"it runs on CPUs, and the model is on {device.type}"
    if dtype not in (None, torch.bfloat16):
        return f"autocast to {dtype} (bfloat16 or none)"
    if dtype is not None and not (
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return "this CPU or torch build has no oneDNN bfloat16 products"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "a module with forward hooks (the packed decoder does not call modules, so it would skip them)"
    weights_dtype = next(model.parameters()).dtype
    if weights_dtype != torch.float32:
        return f"weights in {weights_dtype} (float32 only)"
    config = model.config
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(base, "rotary_emb") or not hasattr(base, "norm"):
        return f"{type(model).__name__} is not a Llama-style decoder (model.layers, rotary_emb, norm)"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} (SiLU only)"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"RoPE type {rope.get('rope_type')!r} (default only)"
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    ):
        return "sliding-window attention"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
        modules = [getattr(attn, n, None) for n in names[0]] + [getattr(mlp, n, None) for n in names[1]]
        if any(type(m) is not nn.Linear for m in modules):  # PEFT's LoRA layers and other wrappers are not plain
            return "a layer whose projections are not plain nn.Linear (LoRA adapters, quantised layers)"
        if any(getattr(layer, n, None) is None for n in ("input_layernorm", "post_attention_layernorm")):
            return "a layer without input_layernorm / post_attention_layernorm"
        if any(type(p) is not nn.Parameter for p in layer.parameters()):  # FSDP2's are DTensor subclasses
            return "sharded parameters (FSDP)"
    return None


def _norm(h: Tensor, norm: nn.Module) -> Tensor:
    """transformers' RMSNorm on a float32 input: w * h / sqrt(mean(h^2) + eps)."""
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of (A, heads, d) by (A, 1, d) cos and sin: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class PackedDecoder:
    """One generation's decoding passes for a Llama-family model (see the module's docstring).

    Args:
        model: the policy, as :func:`unsupported` accepts it; read, never modified (weights are copied).
        cache: the prefill's key/value cache with ONE row per prompt: one (U, kv_heads, P, d) key and value per layer.
        prompt_index: (A,) the prompt each decoded row continues, rows of a prompt consecutive.
        prompt_mask: (U, P) 1 on each prompt's tokens, 0 on its (left) padding.
        max_new_tokens: how many tokens the buffer must hold past the prompt.
        dtype: the autocast dtype the caller decodes under (bfloat16), or None for the model's own float32.
    """

    def __init__(self, model: nn.Module, cache, prompt_index: Tensor, prompt_mask: Tensor, max_new_tokens: int, dtype):
        base = model.model
        self.rotary, self.final_norm, self.embed = base.rotary_emb, base.norm, base.embed_tokens
        self.layers = list(base.layers)
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.heads = attn.q_proj.out_features // self.head_dim
        self.kv_heads = attn.k_proj.out_features // self.head_dim
        self.dtype = dtype or self.embed.weight.dtype  # what products run in
        rows = prompt_index.shape[0]
        self.packed = torch.backends.mkldnn.is_available()  # oneDNN's layout, in float32 too (NOTES.md, change 20)
        with torch.no_grad():
            # built for each generation and dropped with it: never stale after an optimiser step, and no second
            # copy of the weights alive during the update (~150 ms a build for the embedded model, 2 cores)
            self.weights = [self._layer_weights(layer, rows) for layer in self.layers]
            self.head = self._weight(model.get_output_embeddings(), rows)
            # keys and values in float32 whatever the products' dtype: under bfloat16 autocast they hold the
            # bfloat16 values transformers' attention reads, which accumulates in float32 as this one does
            self.prompt_keys = torch.stack([layer.keys for layer in cache.layers]).float()  # (L, U, kv_heads, P, d)
            self.prompt_values = torch.stack([layer.values for layer in cache.layers]).float()
            shape = (len(self.layers), rows, self.kv_heads, max_new_tokens, self.head_dim)
            self.keys = self.prompt_keys.new_empty(shape)  # (L, A, kv_heads, max_new_tokens, d): this generation's
            self.values = torch.empty_like(self.keys)
        zero = torch.zeros((), dtype=torch.float32, device=prompt_mask.device)
        minimum = torch.tensor(torch.finfo(torch.float32).min, device=prompt_mask.device)
        self.prompt_bias = torch.where(prompt_mask.bool(), zero, minimum)[:, None, None]  # (U, 1, 1, P)
        self.length = 0  # new tokens in the buffer
        self._place(prompt_index)

    def _place(self, prompt_index: Tensor) -> None:
        """Where each active row's queries go in the per-prompt layout of :meth:`_to_prompts`: prompt u's
        rows fill slots u * W ... u * W + (its rows - 1), W = the most rows any prompt has left."""
        prompts = self.prompt_keys.shape[1]
        counts = torch.bincount(prompt_index, minlength=prompts)  # (U,)
        first = torch.cumsum(counts, 0) - counts  # (U,) each prompt's first row (rows of a prompt consecutive)
        self.width = int(counts.max())
        rank = torch.arange(prompt_index.shape[0], device=prompt_index.device) - first[prompt_index]
        self.prompt_index, self.slot = prompt_index, prompt_index * self.width + rank  # (A,) each

    def _weight(self, linear: nn.Linear, rows: int, *more: nn.Linear) -> tuple[Tensor, Tensor | None]:
        """The weight (and bias) of ``linear`` and ``more`` concatenated along the output axis, ready for
        :meth:`_product`: cast to the decoding dtype and packed in oneDNN's layout for ``rows`` rows (as they are
        where this torch build has no oneDNN)."""
        modules = (linear, *more)
        bias = None if linear.bias is None else torch.cat([m.bias.detach() for m in modules]).to(self.dtype)
        if not self.packed:
            weight = torch.cat([m.weight.detach() for m in modules]) if more else linear.weight.detach()
            return weight.contiguous(), bias
        weight = (
            torch.cat([m.weight.detach().to(self.dtype) for m in modules]) if more else linear.weight.to(self.dtype)
        )
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows), bias

    def _layer_weights(self, layer: nn.Module, rows: int) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        return {
            "qkv": self._weight(attn.q_proj, rows, attn.k_proj, attn.v_proj),
            "o": self._weight(attn.o_proj, rows),
            "gate_up": self._weight(mlp.gate_proj, rows, mlp.up_proj),
            "down": self._weight(mlp.down_proj, rows),
        }

    def _product(self, x: Tensor, weight: tuple[Tensor, Tensor | None]) -> Tensor:
        """x W^T (+ b) in the decoding dtype: (A, in) -> (A, out)."""
        w, b = weight
        x = x.to(self.dtype)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)

    def keep(self, rows: Tensor) -> None:
        """Keep only these rows (the others finished)."""
        self.keys, self.values = self.keys.index_select(1, rows), self.values.index_select(1, rows)
        self._place(self.prompt_index[rows])

    @torch.no_grad()
    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One token per active row: (A,) ids at (A,) positions -> (A, V) logits of the next token, in the decoding
        dtype. Each row attends its prompt's unpadded tokens and every token it has decoded."""
        with torch.autocast(tokens.device.type, enabled=False):
            return self._step(tokens, positions)

    def _step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        rows, t = tokens.shape[0], self.length
        h = self.embed(tokens)  # (A, D) the residual stream, float32
        cos, sin = self.rotary(h, positions[:, None])  # (A, 1, d) each
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        for i, (layer, w) in enumerate(zip(self.layers, self.weights)):
            qkv = self._product(_norm(h, layer.input_layernorm), w["qkv"])  # (A, (heads + 2 kv_heads) d)
            q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
            # float32, as transformers' rotary promotes it; queries, keys and values rounded to the products' dtype
            q = _rotate(q.view(rows, heads, d), cos, sin).to(self.dtype).float()
            self.keys[i, :, :, t] = _rotate(k.view(rows, kv_heads, d), cos, sin).to(self.dtype)
            self.values[i, :, :, t] = v.view(rows, kv_heads, d)
            # grouped-query attention: the heads / kv_heads query heads that share a key/value head (transformers'
            # repeat_kv order: head j reads kv head j // group) are that head's queries: no expanded keys, no copies
            attended = self._attention(i, q.view(rows, kv_heads, heads // kv_heads, d), t + 1)
            h = h + self._product(attended.reshape(rows, heads * d), w["o"])
            gate, up = self._product(_norm(h, layer.post_attention_layernorm), w["gate_up"]).chunk(2, dim=-1)
            h = h + self._product(F.silu(gate) * up, w["down"])
        self.length = t + 1
        return self._product(_norm(h, self.final_norm), self.head)  # (A, V)

    def _attention(self, i: int, q: Tensor, n: int) -> Tensor:
        """Layer i's attention of (A, kv_heads, g, d) queries over their prompt's P keys and their own n decoded
        ones, as one softmax over both:

            s = [q K_prompt^T / sqrt(d) + mask,  q K_new^T / sqrt(d)]      (A, kv_heads, g, P + n)
            out = softmax(s)[..., :P] V_prompt + softmax(s)[..., P:] V_new  (A, kv_heads, g, d)

        The prompt's keys and values are stored once per prompt, not once per row: its G rows' queries are
        stacked into one product against them (:meth:`_to_prompts`), so a decoding step reads each prompt's cache
        once instead of G times (benchmarks/NOTES.md, change 22)."""
        keys, values = self.prompt_keys[i], self.prompt_values[i]  # (U, kv_heads, P, d)
        prompt = keys.shape[2]
        prompt_scores = torch.matmul(self._to_prompts(q), keys.transpose(-1, -2))  # (U, kv_heads, W g, P)
        prompt_scores = self._from_prompts(prompt_scores.mul_(self.scaling).add_(self.prompt_bias), q.shape[2])
        new_scores = torch.matmul(q, self.keys[i, :, :, :n].transpose(-1, -2)).mul_(self.scaling)  # (A, kv, g, n)
        weights = torch.cat([prompt_scores, new_scores], dim=-1).softmax(-1)  # (A, kv_heads, g, P + n)
        out = torch.matmul(self._to_prompts(weights[..., :prompt].contiguous()), values)  # (U, kv_heads, W g, d)
        return self._from_prompts(out, q.shape[2]).add_(torch.matmul(weights[..., prompt:], self.values[i, :, :, :n]))

    def _to_prompts(self, x: Tensor) -> Tensor:
        """(A, kv_heads, g, m) per row -> (U, kv_heads, W g, m) per prompt, its rows' slots stacked (empty: 0)."""
        rows, kv_heads, group, m = x.shape
        prompts = self.prompt_keys.shape[1]
        slots = x.new_zeros(prompts * self.width, kv_heads, group, m).index_copy_(0, self.slot, x)
        return slots.view(prompts, self.width, kv_heads, group, m).transpose(1, 2).reshape(prompts, kv_heads, -1, m)

    def _from_prompts(self, x: Tensor, group: int) -> Tensor:
        """The inverse of :meth:`_to_prompts`: (U, kv_heads, W g, m) -> (A, kv_heads, g, m)."""
        prompts, kv_heads, _, m = x.shape
        x = x.view(prompts, kv_heads, self.width, group, m).transpose(1, 2).reshape(-1, kv_heads, group, m)
        return x.index_select(0, self.slot)
