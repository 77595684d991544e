"""Building blocks of the models: parallel linear layers, embedding/LM head, norms, RoPE,
attention, and the partition rules that say which slice each rank holds."""
