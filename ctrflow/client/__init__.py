"""Client-side helpers for bidders that compute model inputs themselves (no TensorFlow)."""
