"""Wide-block Reed-Solomon (mcproto.fec_wide): any k of k + R symbols rebuild a block, bit-exact."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("reed_solomon_leopard", reason="reed-solomon-leopard not installed (wide-block code)")

from mcproto import fec_wide
from mcproto.fec_wide import Codec, WideLayout, default_repair, split_block


def _block(k: int, size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(k)]


def _all_symbols(codec: Codec, src: list[bytes]) -> dict[int, bytes]:
    k = len(src)
    rep = codec.repair(src, list(range(k, k + codec.repair_count)))
    return {i: s for i, s in enumerate(src + rep)}


@pytest.mark.parametrize("k", [1, 2, 3, 128, 255, 256, 1024, 2048])
def test_any_k_symbols_decode_bit_exact(k: int) -> None:
    size = 1392
    r = default_repair(k)
    codec = Codec(r)
    src = _block(k, size, k)
    syms = _all_symbols(codec, src)
    rng = random.Random(k)
    for lost_share in (0.05, 0.5):
        lost = min(r, max(1, round(lost_share * k)))  # at most R source symbols can be replaced
        gone = set(rng.sample(range(k), lost))
        ids = [i for i in range(k) if i not in gone] + rng.sample(range(k, k + r), lost)
        rng.shuffle(ids)
        assert Codec(r).decode([syms[i] for i in ids], ids, k) == src


def test_systematic_and_all_source_fast_path() -> None:
    src = _block(64, 100, 1)
    codec = Codec(64)
    ids = list(range(64))[::-1]
    assert codec.decode([src[i] for i in ids], ids, 64) == src
    assert codec.encodes == 0  # nothing computed when every source symbol is there


def test_more_than_k_symbols_and_memoryview_input() -> None:
    k, r = 300, 128
    codec = Codec(r)
    src = _block(k, 64, 2)
    syms = _all_symbols(codec, src)
    ids = list(range(10, k + r))  # k + r - 10 > k symbols, ten source missing
    got = Codec(r).decode([memoryview(bytearray(syms[i])) for i in ids], ids, k)
    assert got == src


def test_repair_is_cached_per_block_and_independent_of_request_order() -> None:
    k, r = 1024, 256
    codec = Codec(r)
    src = _block(k, 1392, 3)
    a = codec.repair(src, [k + 5, k + 1])
    b = codec.repair(src, [k + 1])
    c = codec.repair(src, list(range(k, k + r)))
    assert codec.encodes == 1
    assert a == [c[5], c[1]] and b == [c[1]]
    fresh = Codec(r)
    assert fresh.repair(list(src), [k + 5]) == [c[5]]  # same values from any codec with the same R


def test_cache_is_bounded() -> None:
    codec = Codec(64)
    blocks = [_block(32, 16, i) for i in range(20)]
    for blk in blocks:
        codec.repair(blk, [32])
    assert len(codec._cache) <= 8
    codec.repair(blocks[0], [33])
    assert codec.encodes == 21


def test_sender_and_receiver_must_agree_on_r() -> None:
    """Repair values depend on the power of two >= R: why the Offer must carry R."""
    k = 256
    src = _block(k, 64, 4)
    r64 = Codec(64).repair(src, [k, k + 1])
    r128 = Codec(128).repair(src, [k, k + 1])
    assert r64 != r128
    assert Codec(48).repair(src, [k, k + 1]) == r64  # same power of two: same values
    ids = [*range(2, k), k, k + 1]
    syms = src[2:] + r64
    try:
        wrong = Codec(128).decode(syms, ids, k)
    except ValueError:
        return
    assert wrong != src


def test_bad_input() -> None:
    codec = Codec(64)
    src = _block(16, 32, 5)
    with pytest.raises(ValueError):
        codec.repair(src, [15])  # a source id is not a repair id
    with pytest.raises(ValueError):
        codec.repair(src, [16 + 64])
    with pytest.raises(ValueError):
        codec.decode(src[:15], list(range(15)), 16)
    with pytest.raises(ValueError):
        codec.decode(src[:2] + src[:14], [0, 0, *range(2, 16)], 16)
    with pytest.raises(ValueError):
        codec.decode(src, [*range(15), 16 + 64], 16)
    with pytest.raises(ValueError):
        codec.decode([*src[:15], src[15] + b"x"], list(range(16)), 16)
    with pytest.raises(ValueError):
        Codec(0)
    with pytest.raises(ValueError):
        Codec(fec_wide.R_MAX + 1)


def test_layout() -> None:
    lay = WideLayout(image_size=10_000_000, symbol_size=1392, k=1024)
    assert lay.repair == 1024 and lay.total_symbols == 7184 and lay.blocks == 8
    assert lay.block_k(7) == 16 and lay.n_max(7) == lay.block_k(7) + 1024 and lay.n_max(0) == 2048
    assert lay.fec == "rs16" and lay.repair_ids == 1024
    assert lay.block_len(7) == 10_000_000 - 7 * 1024 * 1392
    assert WideLayout(1, 2, 1).repair == 64
    assert default_repair(32768) == 32768 and default_repair(1000) == 1024 and default_repair(2048) == 2048
    for bad in ({"k": 0}, {"k": fec_wide.K_MAX + 1}, {"symbol_size": 1391}, {"repair": fec_wide.R_MAX + 1}):
        kw = {"image_size": 100, "symbol_size": 1392, "k": 128} | bad
        with pytest.raises(ValueError):
            WideLayout(**kw)


def test_whole_image_round_trip_with_short_last_block() -> None:
    data = os.urandom(3 * 512 * 64 + 1000)
    lay = WideLayout(len(data), 64, 512)
    codec = Codec(lay.repair)
    rng = random.Random(6)
    out = bytearray()
    for b in range(lay.blocks):
        k = lay.block_k(b)
        src = split_block(memoryview(data)[lay.block_offset(b):lay.block_offset(b) + lay.block_len(b)], k, 64)
        syms = _all_symbols(codec, src)
        ids = rng.sample(range(lay.n_max(b)), k)
        out += b"".join(Codec(lay.repair).decode([syms[i] for i in ids], ids, k))[: lay.block_len(b)]
    assert bytes(out) == data


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 600),
    half_size=st.integers(1, 48),
    r_exp=st.integers(0, 9),
    data=st.data(),
)
def test_property_any_k_of_n(k: int, half_size: int, r_exp: int, data: st.DataObject) -> None:
    r = 1 << r_exp
    size = 2 * half_size
    seed = data.draw(st.integers(0, 2**32 - 1))
    src = _block(k, size, seed)
    codec = Codec(r)
    syms = _all_symbols(codec, src)
    ids = data.draw(st.lists(st.integers(0, k + r - 1), min_size=k, max_size=k, unique=True))
    if sum(1 for i in ids if i >= k) > r:  # cannot happen (only r repair ids), kept as a guard
        return
    assert Codec(r).decode([syms[i] for i in ids], ids, k) == src
