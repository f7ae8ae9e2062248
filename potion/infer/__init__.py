"""Generation: sampling rules, prefill and decode, speculative decoding."""
