"""XFRM: the Linux kernel IPsec data plane over netlink (structs, objects, socket, sink)."""
