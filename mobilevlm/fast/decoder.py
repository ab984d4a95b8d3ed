"""A lean LLaMA decoder over an existing `MobileLlamaForCausalLM`: static KV cache, separate prefill and
decode, fused projections, logits only for the last position.

It reuses the model's own weights (for quantized models the fused q/k/v and gate/up matrices are built once and
the model's projections are re-pointed to row views of them, so no weight is held twice) and the model's own norms and
rotary tables, so in fp32 it computes what transformers computes, minus the per-step framework work
(cache objects, masks, output dataclasses) that costs ~8 ms per token at 24 layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mobilevlm.errors import PromptError
from mobilevlm.fast import native
from mobilevlm.fast.memory import release_freed_memory
from mobilevlm.fast.quantize import Int4Linear, Int8Linear


def fuse_linears(linears: list[nn.Module]) -> nn.Module:
    """One linear computing `cat([l(x) for l in linears], -1)`; the inputs become row views of its weight.

    Only int4 linears and int8 ones on the VNNI kernel are fused (their layouts store whole blocks of output rows
    one after another, so they concatenate along rows): full-precision weights loaded by transformers are often
    memory-mapped from the checkpoint, so a fused copy would hold them twice (and was no faster), and fbgemm's
    packed int8 weights cannot be viewed by rows."""
    kinds = {type(linear) for linear in linears}
    if len(kinds) != 1 or any(getattr(linear, "bias", None) is not None for linear in linears):
        return _Concat(linears)
    kind = kinds.pop()
    if kind not in (Int4Linear, Int8Linear):
        return _Concat(linears)
    for linear in linears:
        linear.pack()
    sizes = [linear.out_features for linear in linears]
    if kind is Int4Linear and len({linear.group_size for linear in linears}) == 1:
        kernel = linears[0].kernel
        fused = Int4Linear.from_packed(kernel, torch.cat([linear._packed for linear in linears]),
                                       torch.cat([linear._kernel_scales for linear in linears], kernel.scale_rows_dim),
                                       linears[0].group_size)
        scale_views = kernel.split_scales(fused._kernel_scales, sizes)
        for index, (linear, weights) in enumerate(zip(linears, fused._packed.split(sizes))):
            linear._packed = weights
            if scale_views is not None:
                linear._kernel_scales = scale_views[index]
        return fused
    if kind is Int8Linear and all(linear.kernel == "vnni" for linear in linears):
        fused = Int8Linear.from_packed(torch.cat([linear._packed for linear in linears]),
                                       torch.cat([linear.scales for linear in linears]),
                                       torch.cat([linear._row_sums for linear in linears]))
        parts = zip(linears, fused._packed.split(sizes), fused.scales.split(sizes), fused._row_sums.split(sizes))
        for linear, weights, scales, row_sums in parts:
            linear._packed, linear.scales, linear._row_sums = weights, scales, row_sums
        return fused
    return _Concat(linears)


class _Concat(nn.Module):
    def __init__(self, linears):
        super().__init__()
        self.parts = nn.ModuleList(linears)

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], -1)


class _Layer:
    """References to one decoder layer's pieces (plain attributes: no module hooks on the hot path)."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj
        self.act = mlp.act_fn


class LeanDecoder:
    """Greedy/sampled decoding for one sequence at a time (`prefill` then `step`), on the model's device.

    On a GPU a decode step is a few hundred tiny kernels, so its time is the host's launch time, not the
    GPU's: there the step runs in a fixed-shape form (token and position held in tensors, attention over the
    whole cache under a mask) that is captured once as a CUDA graph and replayed (`cuda_graph`, default on CUDA).
    """

    def __init__(self, model, max_len: int | None = None, cuda_graph: bool | None = None):
        config = model.config
        self.model = model
        inner = model.get_model()
        self.embed, self.norm, self.lm_head = inner.embed_tokens, inner.norm, model.lm_head
        self.layers = []
        for layer in inner.layers:
            self.layers.append(_Layer(layer))
            # fusing replaced this layer's int4 / int8 weights by one copy: return the freed originals at once, or
            # the heap grows layer by layer until the last is done
            release_freed_memory()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.gqa = self.heads != self.kv_heads
        self.max_len = max_len or config.context_length
        self.dtype, self.device = self.norm.weight.dtype, self.norm.weight.device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        with torch.inference_mode():
            self.positions = torch.arange(self.max_len, device=self.device)
            cos, sin = inner.rotary_emb(torch.empty(0, dtype=self.dtype, device=self.device), self.positions[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        shape = (len(self.layers), self.kv_heads, self.max_len, self.head_dim)
        # torch.empty leaves untouched pages unmapped: RSS grows only with the positions actually written. The
        # fixed-shape step reads the whole cache (masked), and masked garbage can still be NaN, so it needs zeros.
        allocate = torch.zeros if self.cuda_graph else torch.empty
        self.k_cache = allocate(shape, dtype=self.dtype, device=self.device)
        self.v_cache = allocate(shape, dtype=self.dtype, device=self.device)
        # CPU attention in bf16 is slower than upcasting the slices for the fp32 flash kernel (docs/notes/speed.md).
        # The upcast goes into preallocated buffers (pages touched only up to the sequence's length): a fresh
        # multi-MB tensor per layer and step would be an mmap and a page fault per page under
        # `limit_heap_retention`, or heap that glibc keeps.
        self._upcast = None
        if self.device.type == "cpu" and self.dtype != torch.float32:
            self._upcast = [torch.empty(self.kv_heads, self.max_len, self.head_dim) for _ in range(2)]
        # A decode step's attention reads the bf16 cache directly in the native kernel, faster still than the
        # upcast + fp32 flash kernel.
        self.native_attention = (self.device.type == "cpu" and self.dtype == torch.bfloat16
                                 and self.head_dim % 16 == 0 and native.available())
        self.length = 0
        self._token = torch.zeros(1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graph = self._graph_logits = None

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attention(self, q, keys, values, **mask) -> torch.Tensor:
        """[heads, T, D] attention; 4-D inputs, since 3-D ones fall back to the slow math kernel on the CPU."""
        if self._upcast is not None:
            length = keys.shape[1]
            keys = self._upcast[0][:, :length].copy_(keys)
            values = self._upcast[1][:, :length].copy_(values)
        out = F.scaled_dot_product_attention(q[None].to(keys.dtype), keys[None], values[None], enable_gqa=self.gqa,
                                             **mask)
        return out[0].to(q.dtype)

    def _layers(self, hidden, cos, sin, store, attend) -> torch.Tensor:
        """The decoder layers over hidden [T, H]; `store(cache, new)` writes a layer's keys or values into
        its cache, `attend(q, k_cache, v_cache)` is the attention over it."""
        steps = hidden.shape[0]
        for index, layer in enumerate(self.layers):
            x = layer.input_norm(hidden)
            q, k, v = layer.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = self._rope(q.view(steps, self.heads, self.head_dim).transpose(0, 1), cos, sin)
            k = self._rope(k.view(steps, self.kv_heads, self.head_dim).transpose(0, 1), cos, sin)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            store(k_cache, k)
            store(v_cache, v.view(steps, self.kv_heads, self.head_dim).transpose(0, 1))
            attn = attend(q, k_cache, v_cache)
            hidden = hidden + layer.o_proj(attn.transpose(0, 1).reshape(steps, self.q_size))
            x = layer.post_norm(hidden)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            hidden = hidden + layer.down(layer.act(gate) * up)
        return hidden

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] at positions length..length+T-1 -> last position's final hidden state [H]."""
        steps = hidden.shape[0]
        start, end = self.length, self.length + steps
        if end > self.max_len:
            raise PromptError(f"the sequence reached {end} tokens; the model's context is {self.max_len}")

        def store(cache, new):
            cache[:, start:end] = new

        # Prefill starts from an empty cache, so causal masking of the new block is the whole mask;
        # a single decode step attends to everything before it.
        def attend(q, k_cache, v_cache):
            if steps == 1 and self.native_attention:
                out = torch.ops.mobilevlm_attention.decode(q[:, 0], k_cache, v_cache, end, self.head_dim ** -0.5)
                return out[:, None].to(q.dtype)
            return self._attention(q, k_cache[:, :end], v_cache[:, :end], is_causal=steps > 1)

        hidden = self._layers(hidden, self.cos[start:end], self.sin[start:end], store, attend)
        self.length = end
        return self.norm(hidden[-1])

    def _fixed_shape_step(self) -> torch.Tensor:
        """One decode step of `self._token` at `self._position` with no shape or Python value depending on
        either, so a CUDA graph of it stays valid for every position."""
        position = self._position
        visible = (self.positions <= position)[None, None]  # [1, 1, max_len]

        def store(cache, new):
            cache.index_copy_(1, position, new)

        def attend(q, k_cache, v_cache):
            return self._attention(q, k_cache, v_cache, attn_mask=visible)

        hidden = self._layers(self.embed(self._token), self.cos.index_select(0, position),
                              self.sin.index_select(0, position), store, attend)
        return self.lm_head(self.norm(hidden[-1])).float()

    def _replay(self) -> torch.Tensor:
        if self._graph is None:
            # warm-up runs on a side stream before capture (as torch.cuda.graphs asks); they compute the very
            # step about to be replayed, so their cache writes are the ones the replay makes again
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._fixed_shape_step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._fixed_shape_step()
            self._graph, self._graph_logits = graph, logits  # only a completed capture is kept for replay
        self._graph.replay()
        return self._graph_logits.clone()

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """Starts a new sequence from its input embeddings [T, H] (or [1, T, H]); returns next-token logits."""
        self.length = 0
        return self.lm_head(self._forward(embeds.reshape(-1, embeds.shape[-1]).to(self.dtype))).float()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Appends one token; returns the logits for the next one."""
        if not self.cuda_graph:
            return self.lm_head(self._forward(self.embed.weight[token][None])).float()
        if self.length >= self.max_len:
            raise PromptError(f"the sequence reached {self.length + 1} tokens; the model's context is {self.max_len}")
        self._token.fill_(token)
        self._position.fill_(self.length)
        logits = self._replay() if self.device.type == "cuda" else self._fixed_shape_step()
        self.length += 1
        return logits

    @torch.inference_mode()
    def embed_prompt(self, input_ids: list[int], images: torch.Tensor | None) -> torch.Tensor:
        """Token ids (with -200 image placeholders) + pixel values -> input embeddings [T, H]."""
        ids = torch.tensor([input_ids], device=self.device)
        if images is None:
            return self.embed(ids)[0]
        embeds, _, _, _ = self.model.prepare_inputs_labels_for_multimodal(
            ids, None, None, images.to(self.device, self.model.dtype))
        release_freed_memory()  # the tower's activations would otherwise stay with the heap
        return embeds[0]
