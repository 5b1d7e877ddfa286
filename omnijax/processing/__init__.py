"""Host-side input processing (numpy, no flax): the batch schema, TM-RoPE position ids, per-row
media buffers, audio and vision bucket/padding helpers. Shared by the data pipelines, the
train step and `omnijax.load`."""
