"""Model layers (attention, MoE, TM-RoPE) and their assembly into the Thinker."""
