"""XFRM message classes: sizes equal the kernel's structs, and messages survive a round trip
through pyroute2's codec with every field where the kernel puts it."""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink import nlmsg

from ipsec.xfrm import structs as s
from ipsec.xfrm.objects import (
    Direction,
    Lifetime,
    Mode,
    PolicySpec,
    PolicyState,
    SaSpec,
    SaState,
    Selector,
    Template,
)

#: sizeof() on x86-64 (and every 64-bit Linux ABI), from include/uapi/linux/xfrm.h.
KERNEL_SIZES = [
    (s.xfrm_usersa_info, 224), (s.xfrm_usersa_id, 24), (s.xfrm_userpolicy_info, 168),
    (s.xfrm_userpolicy_id, 64), (s.xfrm_user_expire, 232), (s.xfrm_user_acquire, 280),
    (s.xfrm_attrs.xfrm_user_tmpl, 64), (s.xfrm_attrs.xfrm_userpolicy_type, 6),
    (s.xfrm_attrs.xfrm_lifetime_cur, 32), (s.xfrm_attrs.xfrm_mark, 8),
    (s.xfrm_attrs.xfrm_replay_state, 12), (s.xfrm_attrs.xfrm_replay_state_esn, 24),
    (s.xfrm_attrs.xfrm_algo_aead, 72),
]


@pytest.mark.parametrize(("cls", "size"), KERNEL_SIZES, ids=lambda x: getattr(x, "__name__", ""))
def test_struct_sizes_match_the_kernel(cls: type[nlmsg], size: int) -> None:
    assert sum(struct.calcsize(fmt) for _, fmt in cls.fields) == size


def _offset(cls: type[nlmsg], field: str) -> int:
    offset = 0
    for name, fmt in cls.fields:
        if name == field:
            return offset
        offset += struct.calcsize(fmt)
    raise KeyError(field)


def test_field_offsets_match_the_kernel() -> None:
    # offsetof() values of the fields whose placement depends on padding.
    assert _offset(s.xfrm_usersa_info, "id_daddr") == 56
    assert _offset(s.xfrm_usersa_info, "lft_soft_byte_limit") == 96
    assert _offset(s.xfrm_usersa_info, "reqid") == 208
    assert _offset(s.xfrm_usersa_info, "flags") == 216
    assert _offset(s.xfrm_userpolicy_info, "priority") == 152
    assert _offset(s.xfrm_userpolicy_info, "dir") == 160
    assert _offset(s.xfrm_attrs.xfrm_user_tmpl, "saddr") == 28
    assert _offset(s.xfrm_attrs.xfrm_user_tmpl, "aalgos") == 52
    assert _offset(s.xfrm_user_acquire, "policy_sel_daddr") == 96
    assert _offset(s.xfrm_user_expire, "hard") == 224


def _roundtrip(msg: nlmsg, cls: type[nlmsg]) -> nlmsg:
    msg["header"] = {"type": 0x10}
    msg.encode()
    out = cls(bytes(msg.data))
    out.decode()
    return out


KEY = bytes(range(36))


@given(spi=st.integers(0x100, 0xFFFF_FFFF), reqid=st.integers(0, 0xFFFF_FFFF),
       v6=st.booleans(), window=st.integers(0, 4096),
       packets=st.none() | st.integers(1, 2**63))
def test_sa_roundtrip(spi: int, reqid: int, v6: bool, window: int, packets: int | None) -> None:
    src, dst = (ip_address("2001:db8::1"), ip_address("2001:db8::2")) if v6 else \
        (ip_address("192.0.2.1"), ip_address("198.51.100.1"))
    sa = SaSpec(src, dst, spi, reqid, Mode.TUNNEL, KEY, window, Lifetime(soft_packets=packets))
    m = _roundtrip(sa.message(), s.xfrm_usersa_info)
    state = SaState.from_message(m)
    assert (state.src, state.dst, state.spi, state.reqid, state.mode) == \
        (src, dst, spi, reqid, Mode.TUNNEL)
    assert state.algorithm == "rfc4106(gcm(aes))"
    assert state.replay_window == window
    assert m["lft_soft_packet_limit"] == (s.XFRM_INF if packets is None else packets)
    assert m["flags"] == s.XFRM_STATE_AF_UNSPEC
    assert m["family"] == (socket.AF_INET6 if v6 else socket.AF_INET)
    # A decoded message never holds the key (dumps carry it).
    assert "alg_key" not in m.get_attr("XFRMA_ALG_AEAD")
    assert KEY.hex() not in repr(m)


def test_an_encoded_sa_carries_the_key_once_and_aligned() -> None:
    sa = SaSpec(ip_address("192.0.2.1"), ip_address("198.51.100.1"), 0x1234, 7,
                Mode.TUNNEL, KEY)
    msg = sa.message()
    msg["header"] = {"type": s.XFRM_MSG_NEWSA}
    msg.encode()
    data = bytes(msg.data)
    assert data.count(KEY) == 1
    assert len(data) % 4 == 0
    assert struct.unpack_from("=I", data)[0] == len(data)  # nlmsg_len covers everything


def test_key_is_never_in_a_repr() -> None:
    sa = SaSpec(ip_address("192.0.2.1"), ip_address("198.51.100.1"), 0x1234, 7,
                Mode.TUNNEL, KEY)
    assert KEY.hex() not in repr(sa)
    assert str(KEY) not in repr(sa)


@given(v6=st.booleans(), block=st.booleans(), prefix=st.integers(8, 24),
       reqid=st.integers(1, 0xFFFF_FFFF), prio=st.integers(0, 2**31))
def test_policy_roundtrip(v6: bool, block: bool, prefix: int, reqid: int, prio: int) -> None:
    if v6:
        sel = Selector(ip_network(f"fd00:a::/{prefix + 40}"), ip_network("fd00:b::/64"))
        ends = ip_address("2001:db8::1"), ip_address("2001:db8::2")
    else:
        sel = Selector(ip_network(f"10.0.0.0/{prefix}"), ip_network("10.200.0.0/16"))
        ends = ip_address("192.0.2.1"), ip_address("198.51.100.1")
    tmpl = None if block else Template(*ends, reqid, Mode.TUNNEL)
    spec = PolicySpec(sel, Direction.OUT, prio, tmpl, block=block)
    state = PolicyState.from_message(_roundtrip(spec.message(), s.xfrm_userpolicy_info))
    assert state == PolicyState(sel, Direction.OUT, prio, block, None if block else reqid)


def test_selector_ports_roundtrip() -> None:
    sel = Selector(ip_network("192.0.2.1/32"), ip_network("198.51.100.1/32"), 6, 0, 9443)
    state = PolicyState.from_message(_roundtrip(
        PolicySpec(sel, Direction.IN, 5).message(), s.xfrm_userpolicy_info))
    assert state.selector == sel
    assert state.selector.reversed().sport == 9443


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"key": bytes(32)}, "36-byte key"),
    ({"spi": 0xFF}, "reserved"),
    ({"dst": ip_address("2001:db8::1")}, "mix IPv4 and IPv6"),
])
def test_bad_sa_is_a_clear_error(kwargs: dict[str, object], error: str) -> None:
    args: dict[str, object] = {"src": ip_address("192.0.2.1"),
                               "dst": ip_address("198.51.100.1"), "spi": 0x1234, "reqid": 1,
                               "mode": Mode.TUNNEL, "key": KEY, **kwargs}
    with pytest.raises(ValueError, match=error):
        SaSpec(**args)  # type: ignore[arg-type]
