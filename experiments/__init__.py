"""Experiments: one module each, ``get_config(arg)`` with comma-separated ``key=value``
arguments (``recipe.parse_arg``); launched as ``python -m omnijax.launch --exp=NAME:ARGS``.

  pretrain_s1_align       stage 1: encoder alignment (LLM frozen; adapters, then encoders)
  pretrain_general        stage 2: every modality mixed from the first step
  pretrain_long_context   stage 3: longer sequences, long audio and video upweighted
  ablation                seed 004's Table 16: text-only vs vision-only vs omni arms
  codec                   the speech tokenizer (16 x 2048 codes at 12.5 Hz) and Code2Wav vocoder
  talker                  the Talker + MTP: pretraining with the Thinker frozen, joint training

``python -m omnijax.chain`` runs the three stages in order; ``python -m omnijax.sweep`` the
ablation's arms over seeds. ``recipe`` holds what they share.
"""
