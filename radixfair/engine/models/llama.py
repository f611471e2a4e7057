"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3 dense) in plain PyTorch over radixfair's KV pool.

Projections are fused (q|k|v and gate|up) so a decode step issues few, large matmuls; the
weights are loaded from Hugging Face-named tensors and concatenated once at load time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from radixfair.engine.decode_attention import native_decode_attention
from radixfair.engine.forward_batch import DecodeGroup, ForwardBatch, ForwardMode, PrefillSeq, WorkspaceStep
from radixfair.engine.kv_pool import KVPool
from radixfair.engine.model_config import ModelConfig, RopeScaling
from radixfair.engine.quant import QuantLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one op, the weight included
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # reduce in float32 as HF does, then round before the weight, so 16-bit runs match the reference
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq, scaled)
    elif scaling.rope_type not in ("default", "none"):
        raise ValueError(f"unsupported rope_scaling type {scaling.rope_type!r}")
    return inv_freq.float()


class Rotary(nn.Module):
    """cos/sin tables for every position, indexed per token (positions need not be contiguous)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`[T, 1, D]` cos and signed sin (`[cos, cos]`, `[-sin, sin]`) for the batch, computed once
        and shared by every layer."""
        cos, sin = self.get_buffer("cos")[positions], self.get_buffer("sin")[positions]
        return torch.cat((cos, cos), -1).unsqueeze(1).to(dtype), torch.cat((-sin, sin), -1).unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (`[T, heads, D]`) in HF's "rotate_half" layout, pairs (i, i + D/2), with the tables
    of `Rotary.tables`: `[x1, x2] * cos + [x2, x1] * sin` is `[x1 cos - x2 sin, x2 cos + x1 sin]`,
    three ops."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj: nn.Linear | QuantLinear = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                                           bias=cfg.attention_bias)
        self.o_proj: nn.Linear | QuantLinear = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        # Qwen3: each q and k head is RMS-normalized over head_dim before rope
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: KVPool, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q and k heads are adjacent in the fused projection: rotate them in one pass
        qk = qkv[:, : self.num_heads + self.num_kv_heads]
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads :])), dim=1)
        qk = apply_rotary(qk, *rope)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        kv.write(self.layer_id, batch.out_slots, k, v)
        if batch.mode is ForwardMode.DECODE:
            out = self._decode(q, k, v, batch, kv)
        elif batch.mode is ForwardMode.PREFILL:
            out = self._prefill(q, k, v, batch, kv)
        else:
            d = batch.decode_start
            out = torch.cat((self._prefill(q[:d], k[:d], v[:d], batch, kv),
                             self._decode(q[d:], k[d:], v[d:], batch, kv)))
        return self.o_proj(out)

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:
        if batch.workspace is not None:
            return self._decode_workspace(q, k, v, batch.workspace)
        assert batch.decode_groups is not None
        groups = batch.decode_groups
        if len(groups) == 1 and groups[0].index is None:
            return self._decode_group(q, groups[0], kv)
        out = torch.empty(q.shape[0], self.q_size, dtype=q.dtype, device=q.device)
        for g in groups:
            assert g.index is not None
            out.index_copy_(0, g.index, self._decode_group(q.index_select(0, g.index), g, kv))
        return out

    def _decode_workspace(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: WorkspaceStep) -> torch.Tensor:
        """Decode attention on views of the per-request contiguous workspace: the new token's K/V is
        appended there (beside the pool write), and rows x kv heads form the matmuls' batch dimension
        with no gather."""
        kw, vw = w.k[self.layer_id], w.v[self.layer_id]  # [R, KVH, D, C] (K transposed), [R, KVH, C, D]
        if w.native:
            attend = native_decode_attention()
            assert attend is not None
            return attend(q, k, v, kw, vw, w.slots, w.lens, self.scale)
        assert w.k_write is not None and w.write_index is not None and w.mask is not None
        d = self.head_dim
        kw.permute(0, 1, 3, 2).index_put_(w.k_write, k.reshape(-1, d))
        vw.view(-1, d).index_copy_(0, w.write_index, v.reshape(-1, d))
        group = self.num_heads // self.num_kv_heads
        b = q.shape[0]
        if w.rows is None:
            qw = q.reshape(b, self.num_kv_heads, group, d)
        else:
            qw = q.new_zeros(w.width, self.num_heads, d).index_copy_(0, w.rows, q.reshape(b, self.num_heads, d))
            qw = qw.view(w.width, self.num_kv_heads, group, d)
        q3 = qw.reshape(-1, group, d)  # [W * KVH, G, D]
        kvh = self.num_kv_heads
        out = q3.new_empty(q3.shape)
        for a, b, cols in w.groups:
            # views: a workspace row's heads are one head's size apart, rows KVH times that
            kt = kw[a:b, :, :, :cols].flatten(0, 1)  # [rows * KVH, D, cols]
            vs = vw[a:b, :, :cols].flatten(0, 1)  # [rows * KVH, cols, D]
            # matmul, scale and mask in one op
            scores = torch.baddbmm(w.mask[a * kvh : b * kvh, :, :cols], q3[a * kvh : b * kvh], kt, alpha=self.scale)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(vs.dtype)
            torch.bmm(probs, vs, out=out[a * kvh : b * kvh])
        out = out.reshape(w.width, self.q_size)
        return out if w.rows is None else out.index_select(0, w.rows)

    def _decode_group(self, q: torch.Tensor, g: DecodeGroup, kv: KVPool) -> torch.Tensor:
        b, lmax = g.kv_index.shape
        group = self.num_heads // self.num_kv_heads
        flat = g.kv_index.view(-1)
        # [KVH, B, L, D]; grouping q heads by their kv head avoids repeating K/V for GQA
        k = kv.k[self.layer_id].index_select(1, flat).view(self.num_kv_heads, b, lmax, self.head_dim)
        v = kv.v[self.layer_id].index_select(1, flat).view(self.num_kv_heads, b, lmax, self.head_dim)
        qg = q.view(b, self.num_kv_heads, group, self.head_dim).transpose(0, 1)  # [KVH, B, G, D]
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * self.scale + g.kv_mask  # [KVH, B, G, L]
        if g.shared_index is None:
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            out = torch.matmul(probs, v)  # [KVH, B, G, D]
            return out.transpose(0, 1).reshape(b, self.q_size)
        # Cascade: the shared prefix is one [KVH, Lp, D] operand for all B*G query rows; the two
        # partial softmaxes are merged exactly through their maxima and sums.
        ks = kv.k[self.layer_id].index_select(1, g.shared_index)  # [KVH, Lp, D]
        vs = kv.v[self.layer_id].index_select(1, g.shared_index)
        q_flat = qg.reshape(self.num_kv_heads, b * group, self.head_dim)
        s_shared = torch.matmul(q_flat, ks.transpose(-1, -2)).float() * self.scale  # [KVH, B*G, Lp]
        s_shared = s_shared.view(self.num_kv_heads, b, group, -1)
        m = torch.maximum(s_shared.amax(-1, keepdim=True), scores.amax(-1, keepdim=True))
        p_shared = torch.exp(s_shared - m)
        p_own = torch.exp(scores - m)
        denom = p_shared.sum(-1, keepdim=True) + p_own.sum(-1, keepdim=True)
        o_shared = torch.matmul(p_shared.to(vs.dtype).view(self.num_kv_heads, b * group, -1), vs)
        o_own = torch.matmul(p_own.to(v.dtype), v)  # [KVH, B, G, D]
        out = (o_shared.view_as(o_own).float() + o_own.float()) / denom
        return out.to(q.dtype).transpose(0, 1).reshape(b, self.q_size)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, kv: KVPool
    ) -> torch.Tensor:
        assert batch.seqs is not None
        outs = [self._prefill_seq(q, k, v, s, kv) for s in batch.seqs]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _prefill_seq(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: PrefillSeq, kv: KVPool
    ) -> torch.Tensor:
        qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        if s.prefix_len == 0:
            ks = k[s.q_start : s.q_start + s.q_len].transpose(0, 1)
            vs = v[s.q_start : s.q_start + s.q_len].transpose(0, 1)
            mask = None
        else:
            assert s.kv_index is not None and s.mask is not None
            ks = kv.k[self.layer_id].index_select(1, s.kv_index)  # [KVH, L, D]
            vs = kv.v[self.layer_id].index_select(1, s.kv_index)
            mask = s.mask
        ks = ks.unsqueeze(0)
        vs = vs.unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
        )
        return o.squeeze(0).transpose(0, 1).reshape(s.q_len, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj: nn.Linear | QuantLinear = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size,
                                                               bias=False)
        self.down_proj: nn.Linear | QuantLinear = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: KVPool, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, kv, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


def _dense(m: nn.Module) -> nn.Linear:
    """A projection that checkpoints load into: dense until `LlamaForCausalLM.quantize`."""
    if not isinstance(m, nn.Linear):
        raise TypeError(f"weights load into dense layers, before quantization, not into {type(m).__name__}")
    return m


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        # None: tied to the embedding (until `quantize` gives it its own quantized copy)
        self.lm_head: nn.Linear | QuantLinear | None = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:
        """Float32 logits `[N, vocab]` for the positions in `batch.logits_index`."""
        x = self.embed_tokens(batch.input_ids)
        rope = self.rotary.tables(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, batch, kv, rope)
        x = x.index_select(0, batch.logits_index) if len(batch.logits_index) != x.shape[0] else x
        x = self.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed_tokens.weight).float()
        return self.lm_head(x).float()

    def compile_layers(self) -> None:
        """`torch.compile` the per-layer pure tensor code (norms and MLP: fused elementwise ops, fewer
        launches); attention stays eager (its Python reads the batch's grouping). Shapes are dynamic,
        so a new batch size does not recompile."""
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            layer.input_layernorm = torch.compile(layer.input_layernorm, dynamic=True)  # type: ignore[assignment]
            layer.post_attention_layernorm = torch.compile(  # type: ignore[assignment]
                layer.post_attention_layernorm, dynamic=True)
            layer.mlp = torch.compile(layer.mlp, dynamic=True)  # type: ignore[assignment]

    def projections(self) -> dict[str, nn.Module]:
        """The decoder layers' matmuls, by name."""
        out: dict[str, nn.Module] = {}
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            out[f"layers.{i}.qkv_proj"] = layer.self_attn.qkv_proj
            out[f"layers.{i}.o_proj"] = layer.self_attn.o_proj
            out[f"layers.{i}.gate_up_proj"] = layer.mlp.gate_up_proj
            out[f"layers.{i}.down_proj"] = layer.mlp.down_proj
        return out

    def input_absmax(self, batch: ForwardBatch, kv: KVPool) -> dict[str, torch.Tensor]:
        """Each projection's input channels' largest magnitude over a forward pass of `batch` (the
        statistics `quantize` smooths int8 activations with)."""
        found: dict[str, torch.Tensor] = {}

        def record(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                x = args[0].detach()
                m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
                found[name] = m if name not in found else torch.maximum(found[name], m)
            return hook

        handles = [m.register_forward_hook(record(n)) for n, m in self.projections().items()]
        try:
            self(batch, kv)
        finally:
            for h in handles:
                h.remove()
        return found

    def quantize(self, kind: str, keep_dense: bool = True, w8a8: bool = False,
                 act_absmax: dict[str, torch.Tensor] | None = None, vnni: bool = False) -> list[QuantLinear]:
        """Replace the projections by `kind` (int8 | int4) quantized layers, and the LM head by an
        int8 one (its errors go straight into the logits: a Q4 GGUF keeps it at Q8_0 too). Returns
        the new layers; `keep_dense` keeps their dequantized weights and `w8a8` an int8 x int8 path
        (smoothed by `act_absmax`, from `input_absmax`), for large batches, and `vnni` the codes in the
        VNNI kernels' layout where they run (see `radixfair.engine.quant`).
        The LM head's int8 activations are not smoothed: its logits' argmax over the whole vocabulary
        is more sensitive to the weight error that smoothing adds than to the activations' error."""
        stats = act_absmax or {}

        def swap(lin: nn.Module, name: str, k: str) -> QuantLinear:
            assert isinstance(lin, nn.Linear)
            return QuantLinear(lin.weight.detach(), lin.bias, k, lin.weight.dtype, keep_dense, w8a8, stats.get(name),
                               vnni)

        out: list[QuantLinear] = []
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj = swap(attn.qkv_proj, f"layers.{i}.qkv_proj", kind)
            attn.o_proj = swap(attn.o_proj, f"layers.{i}.o_proj", kind)
            mlp.gate_up_proj = swap(mlp.gate_up_proj, f"layers.{i}.gate_up_proj", kind)
            mlp.down_proj = swap(mlp.down_proj, f"layers.{i}.down_proj", kind)
            out += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        assert isinstance(w, torch.Tensor)
        self.lm_head = QuantLinear(w.detach(), None, "int8", w.dtype, keep_dense, w8a8, vnni=vnni)
        out.append(self.lm_head)
        return out

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up. Missing or extra tensors raise."""
        cfg = self.config
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in sd:
                raise ValueError(f"checkpoint is missing tensor {name!r}")
            used.add(name)
            return sd[name]

        with torch.no_grad():
            self.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
            self.norm.weight.copy_(take("model.norm.weight"))
            if self.lm_head is not None:
                _dense(self.lm_head).weight.copy_(take("lm_head.weight"))
            elif "lm_head.weight" in sd:
                used.add("lm_head.weight")  # tied checkpoints sometimes carry a copy
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                assert isinstance(layer, DecoderLayer)
                layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
                layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
                attn = layer.self_attn
                _dense(attn.qkv_proj).weight.copy_(
                    torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
                )
                if attn.qkv_proj.bias is not None:
                    _dense(attn.qkv_proj).bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                _dense(attn.o_proj).weight.copy_(take(p + "self_attn.o_proj.weight"))
                if attn.q_norm is not None and attn.k_norm is not None:
                    attn.q_norm.weight.copy_(take(p + "self_attn.q_norm.weight"))
                    attn.k_norm.weight.copy_(take(p + "self_attn.k_norm.weight"))
                _dense(layer.mlp.gate_up_proj).weight.copy_(
                    torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], dim=0)
                )
                _dense(layer.mlp.down_proj).weight.copy_(take(p + "mlp.down_proj.weight"))
        extra = sorted(set(sd) - used)
        if extra:
            raise ValueError(f"checkpoint has tensors this {cfg.architecture} model does not use: {extra[:5]}")

    def weight_bytes_per_decode_step(self, rows: int = 1) -> int:
        """Bytes of weights a pass of `rows` tokens reads: a quantized layer counts the form its
        kernel reads at that size (codes and scales, or its dense copy); embedding rows are
        gathered, not read whole."""
        total = 0
        for name, p in self.named_parameters():
            if name == "embed_tokens.weight" and self.lm_head is not None:
                continue
            total += p.numel() * p.element_size()
        return total + sum(m.bytes_read(rows) for m in self.modules() if isinstance(m, QuantLinear))
