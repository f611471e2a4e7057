"""Text <-> token ids: tokenizers built from GGUF metadata or HF tokenizer files.

* `gguf_vocab` builds a `tokenizers.Tokenizer` that reproduces what the model was trained with from the
  vocabulary a GGUF file carries (it has no tokenizer.json); `hf_dir` reads a HF model directory;
* `chat_template` renders chat templates exactly as `transformers` does, so prompts (and therefore
  prefix-cache hits) are byte-identical to what users of the HF stack get;
* `detokenizer` streams text that never holds half a UTF-8 character nor drops the space in front of a word;
* `tokenizer` is the facade the engine and the server use.

Nothing here needs torch, so a process that only tokenizes (the API server, a router) never loads the
model stack.
"""

from radixfair.tokenizer.detokenizer import IncrementalDetokenizer
from radixfair.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
