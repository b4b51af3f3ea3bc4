"""megatron-lite: Megatron-style tensor + sequence parallel GPT training, small enough to read."""
