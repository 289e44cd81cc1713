"""`qkdgw demo`: two sites on this machine, and the smaller KMS-only demo."""
