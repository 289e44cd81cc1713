"""`qkdgw demo`: two sites on this machine, and the smaller KMS-only demo."""

#: The QBER of `qkdgw demo --qber-spike`: above the gateways' default qber_threshold (0.2),
#: so the link's keys are not used while it lasts.
QBER_SPIKE = 0.3
