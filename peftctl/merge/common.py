"""Names and constants shared by the merge modules."""

from __future__ import annotations

MERGE_INFO = "peftctl_merge.json"
FROM_QUANTIZED = ("dequantized", "original")
OUTPUT_DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "vocab.txt", "spiece.model")
