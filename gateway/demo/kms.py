"""`qkdgw demo`: the KMS simulator and a QKD key fetch on two sites, end to end over mTLS.

Site A asks its KME for new keys as master SAE (enc_keys); site B asks its own KME for the
same keys by ID as slave SAE (dec_keys); the demo shows both hold the same keys (by
fingerprint, never the bytes) and that a key is delivered only once.
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

from common.config import ConfigError
from gateway.initdemo import init_demo
from gateway.site import SiteConfig
from kdf import fingerprint
from kms.config import KmsClientConfig
from kms.errors import KmsBadRequest
from kms.sim.config import SimConfig
from kms.sim.server import Simulator

#: The demo asks for the size an ESP AES-256 key needs.
KEY_BITS = 256


async def run_kms_demo(directory: Path | None, *, keys: int, base_port: int,
                       link_profile: str | None = None) -> int:
    """LINK_PROFILE: the QKD link follows that published field result."""
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="qkdgw-demo-") as tmp:
            return await _run(Path(tmp), keys, base_port, link_profile, fresh=True)
    return await _run(directory, keys, base_port, link_profile,
                      fresh=not (directory / "kms.yaml").exists())


async def _run(root: Path, keys: int, base_port: int, link_profile: str | None, *,
               fresh: bool) -> int:
    if fresh:
        init_demo(root, base_port=base_port)
        print(f"[1/4] demo PKI and configs written to {root}")
    else:
        print(f"[1/4] using the demo setup in {root}")
    config = SimConfig.load(root / "kms.yaml")
    if link_profile is not None:
        config = config.with_profile(link_profile)
    sim = Simulator(config)
    try:
        await sim.start()
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"a demo port is in use ({e.strerror}); pick others with"
                              " --base-port") from None
        raise
    try:
        kms_a = SiteConfig.load(root / "site-a.yaml").kms
        kms_b = SiteConfig.load(root / "site-b.yaml").kms
        if not isinstance(kms_a, KmsClientConfig) or not isinstance(kms_b, KmsClientConfig):
            raise ConfigError("the KMS demo's sites speak ETSI GS QKD 014")
        sae_a, sae_b = kms_a.sae_id, kms_b.sae_id
        print(f"[2/4] KMS simulator up: KME-A {kms_a.url}, KME-B {kms_b.url}")
        async with kms_a.client() as kme_a, kms_b.client() as kme_b:
            st = await kme_a.status(sae_b)
            ext = st.status_extension or {}
            profile = f" (profile {link_profile})" if link_profile else ""
            print(f"      link {ext.get('link')}{profile}: {st.stored_key_count} keys of"
                  f" {st.key_size}"
                  f" bits stored, QBER {ext.get('qber')}, key rate {ext.get('key_rate')} bit/s")
            batch = await kme_a.enc_keys(sae_b, number=keys, size=KEY_BITS)
            print(f"[3/4] site A ({sae_a}) got {keys} key(s) from KME-A (enc_keys);"
                  f" site B ({sae_b}) fetches them by ID from KME-B (dec_keys)")
            got = await kme_b.dec_keys(sae_a, batch.key_ids, size=KEY_BITS)
            print(f"      {'key_ID':<38}{'site A':<18}{'site B':<18}")
            same = 0
            for a, b in zip(batch.keys, got.keys, strict=True):
                fa, fb = fingerprint(a.material), fingerprint(b.material)
                same += a.key_id == b.key_id and a.material == b.material
                print(f"      {a.key_id:<38}{fa:<18}{fb:<18}{'same' if fa == fb else 'DIFFER'}")
            try:
                await kme_b.dec_keys(sae_a, batch.key_ids[:1], size=KEY_BITS)
                once = False
            except KmsBadRequest as e:
                once = True
                print(f"[4/4] a second fetch of {batch.key_ids[0]} is refused: {e.message}")
    finally:
        await sim.stop()
    ok = same == keys and once
    print(f"result: {same} of {keys} keys identical on both sites,"
          f" delivered {'once' if once else 'MORE THAN ONCE'}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1
