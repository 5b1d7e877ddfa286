"""Interoperability with transformers' Qwen3-Omni: config.json, key maps, safetensors I/O,
tokenizer and processor files."""
