"""The gateway as a SKIP Key Provider (draft-cisco-skip-02) for its site's routers: they get
the link's hybrid keys as IKEv2 post-quantum preshared keys."""
