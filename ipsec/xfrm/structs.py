"""XFRM netlink messages (`include/uapi/linux/xfrm.h`) on pyroute2's netlink base.

One class per kernel struct, named after it, quoting the C definition. pyroute2 parses
fields one by one, so nested structs are flattened with a prefix (`sel_`, `id_`, `lft_`,
...) and the C compiler's padding is spelled out; `tests/ipsec/test_structs.py` checks every
size against the kernel's (x86-64 and every other 64-bit ABI Linux runs on).

Addresses are `xfrm_address_t`: 16 raw bytes, an IPv4 address in the first 4. SPIs and
ports are big-endian on the wire, everything else host order.

Pure codec: no sockets here (see `ipsec.xfrm.netlink`).
"""

from __future__ import annotations

from pyroute2.netlink import nla, nlmsg

# -- message types (enum XFRM_MSG_*) ---------------------------------------------------------
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A

# -- multicast groups (enum xfrm_nlgroups) ---------------------------------------------------
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2

# -- constants ------------------------------------------------------------------------------
NETLINK_XFRM = 6
IPPROTO_ESP = 50
XFRM_INF = 0xFFFF_FFFF_FFFF_FFFF  # "no limit" in struct xfrm_lifetime_cfg
XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1
XFRM_POLICY_TYPE_MAIN = 0
XFRM_SHARE_ANY = 0
XFRM_STATE_AF_UNSPEC = 32  # xfrm_usersa_info.flags: inner family may differ from outer

# -- nested structs, as field lists ------------------------------------------------------------

#: struct xfrm_selector {
#:     xfrm_address_t daddr; xfrm_address_t saddr;
#:     __be16 dport; __be16 dport_mask; __be16 sport; __be16 sport_mask;
#:     __u16 family; __u8 prefixlen_d; __u8 prefixlen_s; __u8 proto;
#:     int ifindex; __kernel_uid32_t user;
#: };                                                               /* 56 bytes */
XFRM_SELECTOR = (
    ("daddr", "16s"), ("saddr", "16s"),
    ("dport", ">H"), ("dport_mask", ">H"), ("sport", ">H"), ("sport_mask", ">H"),
    ("family", "H"), ("prefixlen_d", "B"), ("prefixlen_s", "B"), ("proto", "B"),
    ("__pad", "3x"), ("ifindex", "i"), ("user", "I"),
)

#: struct xfrm_id { xfrm_address_t daddr; __be32 spi; __u8 proto; };  /* 24 bytes */
XFRM_ID = (("daddr", "16s"), ("spi", ">I"), ("proto", "B"), ("__pad", "3x"))

#: struct xfrm_lifetime_cfg {
#:     __u64 soft_byte_limit, hard_byte_limit, soft_packet_limit, hard_packet_limit;
#:     __u64 soft_add_expires_seconds, hard_add_expires_seconds;
#:     __u64 soft_use_expires_seconds, hard_use_expires_seconds;
#: };                                                               /* 64 bytes */
XFRM_LIFETIME_CFG = tuple((name, "Q") for name in (
    "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
    "soft_add_expires_seconds", "hard_add_expires_seconds",
    "soft_use_expires_seconds", "hard_use_expires_seconds"))

#: struct xfrm_lifetime_cur { __u64 bytes, packets, add_time, use_time; };  /* 32 bytes */
XFRM_LIFETIME_CUR = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))

#: struct xfrm_stats { __u32 replay_window; __u32 replay; __u32 integrity_failed; };
XFRM_STATS = (("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I"))


def _prefixed(prefix: str, fields: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A nested struct's fields, flattened: `sel_` + `daddr` ... (padding keeps `__pad`)."""
    return tuple((name if name == "__pad" else prefix + name, fmt) for name, fmt in fields)


#: struct xfrm_usersa_info {
#:     struct xfrm_selector sel; struct xfrm_id id; xfrm_address_t saddr;
#:     struct xfrm_lifetime_cfg lft; struct xfrm_lifetime_cur curlft;
#:     struct xfrm_stats stats; __u32 seq; __u32 reqid; __u16 family;
#:     __u8 mode; __u8 replay_window; __u8 flags;
#: };                                                              /* 224 bytes */
XFRM_USERSA_INFO = (
    *_prefixed("sel_", XFRM_SELECTOR), *_prefixed("id_", XFRM_ID), ("saddr", "16s"),
    *_prefixed("lft_", XFRM_LIFETIME_CFG), *_prefixed("curlft_", XFRM_LIFETIME_CUR),
    *_prefixed("stats_", XFRM_STATS), ("seq", "I"), ("reqid", "I"), ("family", "H"),
    ("mode", "B"), ("replay_window", "B"), ("flags", "B"), ("__pad", "7x"),
)

#: struct xfrm_userpolicy_info {
#:     struct xfrm_selector sel; struct xfrm_lifetime_cfg lft;
#:     struct xfrm_lifetime_cur curlft; __u32 priority; __u32 index;
#:     __u8 dir; __u8 action; __u8 flags; __u8 share;
#: };                                                              /* 168 bytes */
XFRM_USERPOLICY_INFO = (
    *_prefixed("sel_", XFRM_SELECTOR), *_prefixed("lft_", XFRM_LIFETIME_CFG),
    *_prefixed("curlft_", XFRM_LIFETIME_CUR), ("priority", "I"), ("index", "I"),
    ("dir", "B"), ("action", "B"), ("flags", "B"), ("share", "B"), ("__pad", "4x"),
)


def _defaults(fields: tuple[tuple[str, str], ...]) -> dict[str, bytes]:
    """Unset byte-string fields encode as zeros (pyroute2's default, 0, only suits numbers)."""
    return {name: b"" for name, fmt in fields if fmt.endswith("s")}


class xfrm_attrs(nlmsg):
    """The attributes (enum xfrm_attr_type_t, XFRMA_*) shared by SA and policy messages."""

    nla_map = (
        ("XFRMA_UNSPEC", "none"),
        ("XFRMA_ALG_AUTH", "hex"),
        ("XFRMA_ALG_CRYPT", "hex"),
        ("XFRMA_ALG_COMP", "hex"),
        ("XFRMA_ENCAP", "hex"),
        ("XFRMA_TMPL", "xfrm_user_tmpl"),
        ("XFRMA_SA", "hex"),
        ("XFRMA_POLICY", "hex"),
        ("XFRMA_SEC_CTX", "hex"),
        ("XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        ("XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        ("XFRMA_REPLAY_THRESH", "uint32"),
        ("XFRMA_ETIMER_THRESH", "uint32"),
        ("XFRMA_SRCADDR", "cdata"),
        ("XFRMA_COADDR", "cdata"),
        ("XFRMA_LASTUSED", "uint64"),
        ("XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        ("XFRMA_MIGRATE", "hex"),
        ("XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        ("XFRMA_KMADDRESS", "hex"),
        ("XFRMA_ALG_AUTH_TRUNC", "hex"),
        ("XFRMA_MARK", "xfrm_mark"),
        ("XFRMA_TFCPAD", "uint32"),
        ("XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        ("XFRMA_SA_EXTRA_FLAGS", "uint32"),
        ("XFRMA_PROTO", "uint8"),
        ("XFRMA_ADDRESS_FILTER", "hex"),
        ("XFRMA_PAD", "none"),
        ("XFRMA_OFFLOAD_DEV", "hex"),
        ("XFRMA_SET_MARK", "uint32"),
        ("XFRMA_SET_MARK_MASK", "uint32"),
        ("XFRMA_IF_ID", "uint32"),
    )

    class xfrm_user_tmpl(nla):
        """struct xfrm_user_tmpl {
            struct xfrm_id id; __u16 family; xfrm_address_t saddr; __u32 reqid;
            __u8 mode; __u8 share; __u8 optional; __u32 aalgos; __u32 ealgos; __u32 calgos;
        };                                                          /* 64 bytes */

        XFRMA_TMPL holds an array of these; this gateway's policies have exactly one."""

        fields = (
            *_prefixed("id_", XFRM_ID), ("family", "H"), ("__pad", "2x"), ("saddr", "16s"),
            ("reqid", "I"), ("mode", "B"), ("share", "B"), ("optional", "B"), ("__pad", "x"),
            ("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"),
        )
        defaults = _defaults(fields)

    class xfrm_lifetime_cur(nla):
        fields = XFRM_LIFETIME_CUR
        defaults = _defaults(fields)

    class xfrm_replay_state(nla):
        """struct xfrm_replay_state { __u32 oseq; __u32 seq; __u32 bitmap; };"""

        fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))
        defaults = _defaults(fields)

    class xfrm_userpolicy_type(nla):
        """struct xfrm_userpolicy_type { __u8 type; __u16 reserved1; __u8 reserved2; };"""

        fields = (("type", "B"), ("__pad", "x"), ("reserved1", "H"), ("reserved2", "B"),
                  ("__pad", "x"))
        defaults = _defaults(fields)

    class xfrm_mark(nla):
        """struct xfrm_mark { __u32 v; __u32 m; };"""

        fields = (("v", "I"), ("m", "I"))
        defaults = _defaults(fields)

    class xfrm_replay_state_esn(nla):
        """struct xfrm_replay_state_esn {
            unsigned int bmp_len; __u32 oseq; __u32 seq; __u32 oseq_hi; __u32 seq_hi;
            __u32 replay_window; __u32 bmp[];
        };

        `bmp_len` counts 32-bit words of the bitmap that follows (zeros when sent)."""

        fields = (("bmp_len", "I"), ("oseq", "I"), ("seq", "I"), ("oseq_hi", "I"),
                  ("seq_hi", "I"), ("replay_window", "I"))
        defaults = _defaults(fields)

        def ft_encode(self, offset: int) -> tuple[int, int]:
            offset, diff = super().ft_encode(offset)
            bitmap = 4 * self["bmp_len"]
            self.data.extend(bytes(bitmap))
            return offset + bitmap, diff

    class xfrm_algo_aead(nla):
        """struct xfrm_algo_aead {
            char alg_name[64]; unsigned int alg_key_len; /* bits */
            unsigned int alg_icv_len; /* bits */ char alg_key[];
        };

        The key follows the struct. It is sent, never kept from a decoded message: dumps
        carry it, and decoded messages end up in logs and reprs."""

        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))
        defaults = _defaults(fields)

        def ft_encode(self, offset: int) -> tuple[int, int]:
            offset, diff = super().ft_encode(offset)
            key: bytes = self["alg_key"]
            self.data.extend(key + bytes(-len(key) % 4))  # the parent aligns to 4 bytes
            return offset + len(key), diff


class xfrm_dump(nlmsg):
    """A dump request (NLM_F_DUMP): no struct, no attributes. The kernel reads a dump's
    payload as attributes only (filters we do not use)."""

    fields = ()


class xfrm_usersa_info(xfrm_attrs):
    """An SA: XFRM_MSG_NEWSA, XFRM_MSG_UPDSA, and XFRM_MSG_GETSA dump entries."""

    fields = XFRM_USERSA_INFO
    defaults = _defaults(fields)


class xfrm_usersa_id(xfrm_attrs):
    """struct xfrm_usersa_id {
        xfrm_address_t daddr; __be32 spi; __u16 family; __u8 proto;
    };                                                              /* 24 bytes */

    Names one SA: XFRM_MSG_DELSA, XFRM_MSG_GETSA."""

    fields = (("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"),
              ("__pad", "x"))
    defaults = _defaults(fields)


class xfrm_userpolicy_info(xfrm_attrs):
    """A policy: XFRM_MSG_NEWPOLICY, XFRM_MSG_UPDPOLICY, XFRM_MSG_GETPOLICY dump entries."""

    fields = XFRM_USERPOLICY_INFO
    defaults = _defaults(fields)


class xfrm_userpolicy_id(xfrm_attrs):
    """struct xfrm_userpolicy_id {
        struct xfrm_selector sel; __u32 index; __u8 dir;
    };                                                              /* 64 bytes */

    Names one policy by selector and direction: XFRM_MSG_DELPOLICY, XFRM_MSG_GETPOLICY."""

    fields = (*_prefixed("sel_", XFRM_SELECTOR), ("index", "I"), ("dir", "B"),
              ("__pad", "3x"))
    defaults = _defaults(fields)


class xfrm_user_expire(xfrm_attrs):
    """struct xfrm_user_expire {
        struct xfrm_usersa_info state; __u8 hard;
    };                                                              /* 232 bytes */

    XFRM_MSG_EXPIRE (group XFRMNLGRP_EXPIRE): an SA reached a soft limit (hard = 0), or a
    hard one and the kernel deleted it (hard = 1)."""

    fields = (*XFRM_USERSA_INFO, ("hard", "B"), ("__pad", "7x"))
    defaults = _defaults(fields)


class xfrm_user_acquire(xfrm_attrs):
    """struct xfrm_user_acquire {
        struct xfrm_id id; xfrm_address_t saddr; struct xfrm_selector sel;
        struct xfrm_userpolicy_info policy;
        __u32 aalgos; __u32 ealgos; __u32 calgos; __u32 seq;
    };                                                              /* 280 bytes */

    XFRM_MSG_ACQUIRE (group XFRMNLGRP_ACQUIRE): a packet matched a policy whose template
    no SA satisfies; the kernel drops it and asks a key manager for one."""

    fields = (*_prefixed("id_", XFRM_ID), ("saddr", "16s"), *_prefixed("sel_", XFRM_SELECTOR),
              *_prefixed("policy_", XFRM_USERPOLICY_INFO), ("aalgos", "I"), ("ealgos", "I"),
              ("calgos", "I"), ("seq", "I"))
    defaults = _defaults(fields)
