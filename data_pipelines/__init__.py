"""Grain input pipelines for omnijax pretraining.

Modules:
  records       on-disk format (msgpack examples in ArrayRecord shards)
  local_corpus  builds a real-English text corpus from the CPython stdlib
  stdlib_text   the text extraction local_corpus runs in an isolated child
  tokenizer     tokenizer.json loading and local byte-level BPE training
  ops           registry of named per-example preprocessing ops
  pipeline      ``make_text_dataset``: packed, checkpointable LM batches
"""
