"""Data: record schemas, loaders (GSM8k-AUG / AUG-NL / GSM8k), eval sets, synthetic problems, tokenizers, batching."""
