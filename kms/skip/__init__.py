"""SKIP, the Secure Key Integration Protocol (IETF draft-cisco-skip-02): Cisco routers' way
to get post-quantum preshared keys from a Key Provider."""
