"""XFRM operations on the kernel of this network namespace: SAs and policies in, out, listed."""

from __future__ import annotations

import errno

from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL

from ipsec.netlink import NetlinkDecodeError
from ipsec.xfrm import structs as s
from ipsec.xfrm.netlink import XfrmError, XfrmSocket
from ipsec.xfrm.objects import PolicyId, PolicySpec, PolicyState, SaId, SaSpec, SaState


class XfrmKernel:
    def __init__(self) -> None:
        self.socket = XfrmSocket()

    def close(self) -> None:
        self.socket.close()

    async def add_sa(self, sa: SaSpec) -> None:
        """XFRM_MSG_NEWSA; an SA with the same destination and SPI is an error (EEXIST),
        never silently replaced."""
        await self.socket.request(sa.message(), s.XFRM_MSG_NEWSA, sa.describe(),
                                  flags=NLM_F_CREATE | NLM_F_EXCL)

    async def delete_sa(self, sa: SaId) -> bool:
        """XFRM_MSG_DELSA. False if there was none (the kernel may have expired it)."""
        try:
            await self.socket.request(sa.message(), s.XFRM_MSG_DELSA, str(sa))
        except XfrmError as e:
            if e.errno == errno.ESRCH or e.errno == errno.ENOENT:
                return False
            raise
        return True

    async def sas(self) -> list[SaState]:
        """Every SA of this namespace (XFRM_MSG_GETSA dump)."""
        answer = await self.socket.request(s.xfrm_dump(), s.XFRM_MSG_GETSA, "all SAs",
                                           dump=True)
        try:
            return [SaState.from_message(m) for m in answer]
        except NetlinkDecodeError as e:
            raise e.in_answer(XfrmError, "XFRM_MSG_GETSA", "all SAs") from None

    async def set_policy(self, policy: PolicySpec) -> None:
        """XFRM_MSG_UPDPOLICY: creates the policy, or replaces the one with the same
        selector and direction in a single step (traffic sees the old or the new one)."""
        await self.socket.request(policy.message(), s.XFRM_MSG_UPDPOLICY, policy.describe())

    async def delete_policy(self, policy: PolicyId) -> bool:
        try:
            await self.socket.request(policy.message(), s.XFRM_MSG_DELPOLICY, str(policy))
        except XfrmError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    async def policies(self) -> list[PolicyState]:
        """Every main policy of this namespace (XFRM_MSG_GETPOLICY dump; socket policies,
        which have no selector of their own, are left out)."""
        answer = await self.socket.request(s.xfrm_dump(), s.XFRM_MSG_GETPOLICY,
                                           "all policies", dump=True)
        try:
            return [PolicyState.from_message(m) for m in answer
                    if m["dir"] <= s.XFRM_POLICY_FWD]
        except NetlinkDecodeError as e:
            raise e.in_answer(XfrmError, "XFRM_MSG_GETPOLICY", "all policies") from None
