"""Evaluation: greedy latent / CoT / No-CoT decoding with pass counting, answer metrics, the kava-eval CLI."""
