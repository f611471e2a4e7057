"""Architecture hyper-parameters of a Llama-family model, independent of the file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Rope scaling as carried by HF configs (`rope_scaling`); only `llama3` and `linear` change math."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen3" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head (head_dim) before rope
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # dtype the checkpoint was stored in, a hint for --dtype auto

    @staticmethod
    def from_hf_dict(cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (Llama, Mistral, Qwen2, Qwen3 dense)."""
        model_type = str(cfg.get("model_type", "llama"))
        if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"unsupported model_type {model_type!r}: expected llama, mistral, qwen2 or qwen3")
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rs_raw = cfg.get("rope_scaling") or {}
        rope_theta = cfg.get("rope_theta")
        # transformers >= 5 folds rope_theta into `rope_parameters`
        rp = cfg.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rp.get("rope_theta", 10000.0)
        if not rs_raw and rp.get("rope_type", "default") != "default":
            rs_raw = rp
        rope_scaling = RopeScaling(
            rope_type=str(rs_raw.get("rope_type", rs_raw.get("type", "default"))),
            factor=float(rs_raw.get("factor", 1.0)),
            low_freq_factor=float(rs_raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs_raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs_raw.get("original_max_position_embeddings", 8192)),
        )
        eos = cfg.get("eos_token_id")
        eos_ids: tuple[int, ...] = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        return ModelConfig(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )
