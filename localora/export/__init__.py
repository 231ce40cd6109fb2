"""Exporting what a search found: the chosen weights baked into one LoRA file."""
