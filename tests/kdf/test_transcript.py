"""The transcript encoding is canonical and injective.

Injectivity is shown two ways: an independent parser (written here from the layout in the
docs) recovers every field from the bytes, so no two transcripts share an encoding; and
hypothesis searches near-collisions directly (one field changed, or bytes moved between
neighbouring fields).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kdf import Party, Transcript


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "truncated"
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def bytes(self) -> bytes:
        return self.take(self.int(4))

    def str(self) -> str:
        return self.bytes().decode("utf-8")

    def party(self) -> Party:
        return Party(self.str(), self.bytes(), self.str(), self.str())

    def end(self) -> None:
        assert self.pos == len(self.data), "trailing bytes"


def parse(context: bytes, ma: bytes, mb: bytes) -> Transcript:
    r = Reader(context)
    assert r.bytes() == b"qkd-gateway transcript"
    version = r.int(2)
    suite, link, epoch = r.str(), r.str(), r.int(8)
    initiator, responder = r.party(), r.party()
    key_ids = tuple(r.str() for _ in range(r.int(4)))
    nonce_i, nonce_r, spi_i, spi_r = r.bytes(), r.bytes(), r.int(4), r.int(4)
    r.end()
    a, b = Reader(ma), Reader(mb)
    ek, pk_i, ct, pk_r = a.bytes(), a.bytes(), b.bytes(), b.bytes()
    a.end()
    b.end()
    return Transcript(suite, link, epoch, initiator, responder, key_ids, nonce_i, nonce_r,
                      spi_i, spi_r, ek, pk_i, ct, pk_r, version)


text = st.text(max_size=12)
blob = st.binary(max_size=12)
parties = st.builds(Party, text, st.binary(min_size=32, max_size=32), text, text)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "suite": text, "link": text, "epoch": st.integers(0, 2**64 - 1),
    "initiator": parties, "responder": parties, "key_ids": st.lists(text, max_size=3).map(tuple),
    "nonce_i": blob, "nonce_r": blob, "spi_i": st.integers(0, 2**32 - 1),
    "spi_r": st.integers(0, 2**32 - 1), "ek_mlkem": blob, "pk_x25519_i": blob,
    "ct_mlkem": blob, "pk_x25519_r": blob, "version": st.integers(0, 2**16 - 1),
}
transcripts = st.builds(Transcript, **FIELDS)


def encode(t: Transcript) -> tuple[bytes, bytes, bytes]:
    return t.context(), t.ma(), t.mb()


@given(transcripts)
def test_the_bytes_determine_the_transcript(t: Transcript) -> None:
    assert parse(*encode(t)) == t


@given(transcripts, transcripts)
def test_different_transcripts_never_encode_alike(a: Transcript, b: Transcript) -> None:
    if a != b:
        assert encode(a) != encode(b)


@given(transcripts, st.data())
def test_near_collisions(t: Transcript, data: st.DataObject) -> None:
    """Move characters across the boundary of two neighbouring text fields, or split a key
    ID in two: a naive concatenation would collide."""
    kind = data.draw(st.sampled_from(["shift", "split", "field"]))
    if kind == "shift":
        joined = t.suite + t.link
        cut = data.draw(st.integers(0, len(joined)))
        other = dataclasses.replace(t, suite=joined[:cut], link=joined[cut:])
    elif kind == "split" and t.key_ids and len(t.key_ids[0]) > 1:
        k = t.key_ids[0]
        cut = data.draw(st.integers(1, len(k) - 1))
        other = dataclasses.replace(t, key_ids=(k[:cut], k[cut:], *t.key_ids[1:]))
    else:
        name = data.draw(st.sampled_from(sorted(FIELDS)))
        other = dataclasses.replace(t, **{name: data.draw(FIELDS[name])})
    if other != t:
        assert encode(other) != encode(t)


def test_layout_example() -> None:
    """One transcript, byte for byte, as docs/key-schedule.md describes the layout."""
    p = Party("gw-a", b"\xaa" * 32, "sae-a", "kme-a")
    q = Party("gw-b", b"\xbb" * 32, "sae-b", "kme-b")
    t = Transcript("s", "ab", 7, p, q, ("k1",), b"N", b"M", 1, 2, b"E", b"X", b"C", b"Y")

    def party(x: Party) -> bytes:
        return (b"\0\0\0\x04" + x.gateway.encode() + b"\0\0\0\x20" + x.cert_sha256
                + b"\0\0\0\x05" + x.sae_id.encode() + b"\0\0\0\x05" + x.kme_id.encode())

    assert t.context() == (b"\0\0\0\x16qkd-gateway transcript\0\x01" + b"\0\0\0\x01s"
                           + b"\0\0\0\x02ab" + (7).to_bytes(8, "big") + party(p) + party(q)
                           + b"\0\0\0\x01" + b"\0\0\0\x02k1" + b"\0\0\0\x01N" + b"\0\0\0\x01M"
                           + b"\0\0\0\x01" + b"\0\0\0\x02")
    assert (t.ma(), t.mb()) == (b"\0\0\0\x01E\0\0\0\x01X", b"\0\0\0\x01C\0\0\0\x01Y")
