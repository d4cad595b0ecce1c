"""The signed manifest: known answers for the Ed25519 glue, and no forged or damaged manifest accepted."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mcproto import manifest as mf

# RFC 8032, section 7.1, TEST 1 (empty message).
RFC_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIG = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
                        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")

KEY = Ed25519PrivateKey.generate()
CHUNK = 4096
IMAGE = os.urandom(5 * CHUNK + 123)


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_ed25519_known_answer_through_our_key_loading() -> None:
    key = Ed25519PrivateKey.from_private_bytes(RFC_SECRET)
    assert mf.public_bytes(key.public_key()) == RFC_PUBLIC
    assert key.sign(b"") == RFC_SIG
    mf.load_public_key(RFC_PUBLIC.hex()).verify(RFC_SIG, b"")


def test_sign_verify_and_check_every_chunk() -> None:
    m = mf.build("win11", chunks(IMAGE), CHUNK)
    blob = mf.sign(m, KEY)
    got = mf.verify(blob, KEY.public_key())
    assert got.key_id == mf.key_id(KEY.public_key())
    assert got.size == len(IMAGE) and got.chunks == 6
    for i, c in enumerate(chunks(IMAGE)):
        assert got.check_chunk(i, c)
    assert not got.check_chunk(0, b"\x00" + chunks(IMAGE)[0][1:])
    assert not got.check_chunk(5, chunks(IMAGE)[5] + b"\x00")  # length counts
    assert not got.check_chunk(6, b"")


def test_another_key_is_refused() -> None:
    blob = mf.sign(mf.build("img", chunks(IMAGE), CHUNK), KEY)
    with pytest.raises(mf.ManifestError, match="signature"):
        mf.verify(blob, Ed25519PrivateKey.generate().public_key())


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_no_change_to_a_signed_manifest_is_accepted(data: st.DataObject) -> None:
    blob = bytearray(mf.sign(mf.build("img", chunks(IMAGE), CHUNK), KEY))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    else:
        blob += data.draw(st.binary(min_size=1, max_size=16))
    with pytest.raises(mf.ManifestError):
        mf.verify(bytes(blob), KEY.public_key())


def test_build_refuses_ragged_chunks() -> None:
    with pytest.raises(mf.ManifestError):
        mf.build("img", [b"x" * 10, b"y" * CHUNK], CHUNK)
