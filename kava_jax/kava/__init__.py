"""KaVa core as pure functions over arrays: batch layout, teacher pass, KV compression, latent student, losses."""
