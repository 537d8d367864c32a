"""EditReward: a Qwen3.5 vision-language reward model of instruction edits (images: its differentiable image path)."""
