"""Data-plane sinks for IPsec: kernel XFRM over netlink and strongSwan over VICI."""
