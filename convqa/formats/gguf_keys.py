"""The GGUF keys convqa adds, shared by the GGUF reader (convqa.formats.gguf) and writer
(convqa.formats.gguf_writer), so neither imports the other and each keeps its own fingerprint.

The padding count lets the reader hand back the tokenizer as it was before the writer padded
the token list to the embedding rows (llama.cpp needs len(tokens) == n_vocab).
"""

PROVENANCE_KEY = "convqa.provenance"
TOKENIZER_PADDING_KEY = "convqa.tokenizer.padded_tokens"
# The registry architecture when it is not the GGUF architecture's default (mistral is written as llama).
ARCHITECTURE_KEY = "convqa.architecture"
