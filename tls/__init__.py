"""Data-plane sinks for TLS 1.3 external PSKs: stunnel, OpenSSL and Python's ssl."""
