"""TPC masks without a GPU: mask arithmetic, placement, the TPC map and its cache (pure logic).

The C library is tested in test_tpc_native.py, the backend on simulated GPUs in
test_tpc_backend_sim.py, and on a real GPU in test_tpc_gpu.py.
"""

from __future__ import annotations

import json

import pytest

from bullet_kernels.errors import InvalidSplitError
from bullet_kernels.partition import SMSplit, backend_class, grant_tpc
from bullet_kernels.partition.tpc import native
from bullet_kernels.partition.tpc.masks import (
    N_BITS,
    TpcMap,
    TpcMapError,
    TpcMask,
    cache_path,
    load_cached,
    place_lanes,
    probe_map,
    save_cached,
)


# ---- TpcMask ------------------------------------------------------------------------------------


def test_mask_set_operations():
    a, b = TpcMask.range(0, 8), TpcMask.of(4, 9, 127)
    assert list(a | b) == [*range(8), 9, 127]
    assert list(a & b) == [4]
    assert list(a - b) == [0, 1, 2, 3, 5, 6, 7]
    assert a.union(b) == a | b and a.intersection(b) == a & b
    assert len(a) == a.popcount() == 8
    assert 127 in b and 128 not in b and "x" not in b
    assert not TpcMask() and TpcMask.of(0)


def test_mask_complement_within_n():
    assert list(TpcMask.range(0, 60).complement(66)) == list(range(60, 66))
    assert len(TpcMask.of(3).complement()) == N_BITS - 1


def test_disabled_words_are_the_complement_in_four_uint32():
    mask = TpcMask.range(0, 8) | TpcMask.of(64, 65)
    assert mask.disabled_words() == [0xFFFFFF00, 0xFFFFFFFF, 0xFFFFFFFC, 0xFFFFFFFF]
    assert TpcMask.from_disabled_words(mask.disabled_words()) == mask
    assert TpcMask.all().disabled_words() == [0, 0, 0, 0]


def test_hex_and_range_text_round_trip():
    mask = TpcMask.from_ranges("0-7,64-65")
    assert str(mask) == "0-7,64-65" and repr(mask) == "TpcMask(0-7,64-65)"
    assert TpcMask.from_hex(mask.hex()) == mask
    assert mask.hex() == hex((1 << 64) | (1 << 65) | 0xFF)
    assert repr(TpcMask()) == "TpcMask(empty)"


@pytest.mark.parametrize(
    "bad",
    [lambda: TpcMask.of(128), lambda: TpcMask.of(-1), lambda: TpcMask(1 << 128), lambda: TpcMask.range(5, 4),
     lambda: TpcMask.from_ranges("0-x"), lambda: TpcMask.from_hex("zz"), lambda: TpcMask.from_disabled_words([0] * 3)],
)
def test_mask_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        bad()


def test_mask_is_immutable_and_hashable():
    mask = TpcMask.of(1)
    with pytest.raises(AttributeError):
        mask._bits = 3
    assert {mask: 1}[TpcMask.of(1)] == 1


# ---- placement ----------------------------------------------------------------------------------


def test_disjoint_lanes_sit_side_by_side_from_tpc0():
    granted = grant_tpc(SMSplit(prefill=96, decode=36), 132)
    assert place_lanes(granted, 66, overlap=False) == {"prefill": range(0, 48), "decode": range(48, 66)}


def test_odd_counts_round_up_to_whole_tpcs():
    granted = grant_tpc(SMSplit(prefill=95, decode=35), 132)
    assert granted == {"prefill": 96, "decode": 36}
    assert place_lanes(granted, 66, overlap=False)["decode"] == range(48, 66)


def test_overlap_places_first_lane_low_second_high():
    split = SMSplit(prefill=100, decode=64, overlap=True)
    places = place_lanes(grant_tpc(split, 132), 66, overlap=True)
    assert places == {"prefill": range(0, 50), "decode": range(34, 66)}
    assert set(places["prefill"]) & set(places["decode"]) == set(range(34, 50))


def test_placement_refuses_what_does_not_fit():
    with pytest.raises(InvalidSplitError, match="this GPU has 66"):
        place_lanes({"a": 100, "b": 40}, 66, overlap=False)
    with pytest.raises(InvalidSplitError, match="allowed: 1..66"):
        place_lanes({"a": 134}, 66, overlap=False)


# ---- TpcMap -------------------------------------------------------------------------------------


def test_linear_map_gives_bit_b_sms_2b_and_2b_plus_1():
    tmap = TpcMap.linear(132).validate()
    assert tmap.tpc_count == 66 and tmap.live == TpcMask.range(0, 66)
    assert tmap.sms(TpcMask.of(0, 65)) == {0, 1, 130, 131}
    assert tmap.mask_for(range(2, 4)) == TpcMask.of(2, 3)


def test_map_with_floorswept_bits_numbers_logical_tpcs_by_live_bits():
    bits = [frozenset()] * N_BITS
    bits[1], bits[3], bits[4] = frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5})
    tmap = TpcMap(6, tuple(bits)).validate()
    assert tmap.live_bits == (1, 3, 4)
    assert tmap.mask_for(range(0, 2)) == TpcMask.of(1, 3)
    with pytest.raises(ValueError, match="out of range"):
        tmap.mask_for(range(0, 4))


def test_map_json_round_trip():
    tmap = TpcMap.linear(132, uuid="GPU-1234", driver="13000/580.159.04")
    again = TpcMap.from_json(tmap.to_json())
    assert again == tmap


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["bits"].__setitem__("1", [0, 1]), "reached by bits 0 and 1"),
        (lambda d: d["bits"].pop("65"), "SMs 130-131 are reached by no bit"),
        (lambda d: d["bits"].__setitem__("65", [130, 132]), "outside 0..131"),
        (lambda d: d["bits"].__setitem__("128", [5]), "allowed: 0..127"),
        (lambda d: d.__setitem__("format", 99), "format 99"),
        (lambda d: d.pop("sm_count"), "cannot read"),
    ],
)
def test_map_validation_failures_say_what_is_wrong(edit, message):
    doc = json.loads(TpcMap.linear(132).to_json())
    edit(doc)
    with pytest.raises(TpcMapError, match=message):
        TpcMap.from_json(json.dumps(doc))


def test_cache_round_trip_and_staleness(tmp_path, monkeypatch):
    monkeypatch.setenv("BULLET_CACHE_DIR", str(tmp_path))
    tmap = TpcMap.linear(132, uuid="GPU-ab", driver="13000/580")
    path = save_cached(tmap)
    assert path.parent == tmp_path and path == cache_path("GPU-ab", "13000/580")
    assert load_cached("GPU-ab", "13000/580", 132) == (tmap, "")
    assert load_cached("GPU-ab", "13010/590", 132)[0] is None  # new driver: re-probe
    doc = json.loads(path.read_text())
    doc["bits"]["65"] = [129, 131]  # SM 129 twice, SM 130 nowhere
    path.write_text(json.dumps(doc))
    got, why = load_cached("GPU-ab", "13000/580", 132)
    assert got is None and "unusable" in why


def _fake_gpu(bits: list[frozenset[int]], sm_count: int):
    """observe() of a GPU whose bit b reaches bits[b]; fails like a hung kernel on no SM."""
    launched = []

    def observe(mask: TpcMask) -> frozenset[int]:
        sms = frozenset().union(*(bits[b] for b in mask if b < len(bits)))
        assert sms, f"launched with no live TPC: {mask!r}"  # on a GPU this never finishes
        launched.append(mask)
        return sms

    return observe, launched


def test_probe_map_finds_h100_layout_and_stops_early():
    linear = TpcMap.linear(132)
    observe, launched = _fake_gpu(list(linear.bits[:66]), 132)
    assert probe_map(observe, 132).bits == linear.bits
    assert len(launched) == 1 + 66


def test_probe_map_survives_floorswept_bit0():
    bits = [frozenset(), frozenset({2, 3}), frozenset(), frozenset({0, 1})]
    observe, _ = _fake_gpu(bits, 4)
    tmap = probe_map(observe, 4)
    assert tmap.live_bits == (1, 3) and tmap.bits[3] == {0, 1}


def test_probe_map_refuses_when_masks_do_nothing():
    with pytest.raises(TpcMapError, match="reached by no bit"):
        probe_map(lambda mask: frozenset(range(8)), 8)  # e.g. a wrong offset: masks ignored
    with pytest.raises(TpcMapError, match="ran on 6 of 8"):
        probe_map(lambda mask: frozenset(range(6)), 8)


# ---- backend without a GPU ------------------------------------------------------------------------


def test_unavailable_without_gpu():
    assert backend_class("tpc").unavailable_reason(None) == "no GPU"


def test_missing_library_reason_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("BULLET_TPC_LIB", str(tmp_path / "nope.so"))
    native.find_library.cache_clear()
    try:
        why = native.unavailable_reason()
    finally:
        monkeypatch.delenv("BULLET_TPC_LIB")
        native.find_library.cache_clear()
    assert why.startswith("native library not built") and "C compiler" in why and "nope.so" in why


def test_a_library_that_is_not_a_shared_object_is_reported(monkeypatch, tmp_path):
    bogus = tmp_path / native.LIB_NAME
    bogus.write_text("not an ELF file")
    monkeypatch.setenv("BULLET_TPC_LIB", str(bogus))
    native.find_library.cache_clear()
    try:
        why = native.unavailable_reason()
    finally:
        monkeypatch.delenv("BULLET_TPC_LIB")
        native.find_library.cache_clear()
    assert why.startswith(f"native library unusable: {bogus} cannot be loaded") and "C compiler" in why
