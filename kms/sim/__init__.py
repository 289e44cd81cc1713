"""A simulator of QKD links: for each link, the two KMEs serving ETSI GS QKD 014 over mTLS."""
