"""SMSplit validation and the grant rules of each backend (CPU)."""

import pytest

from bullet_kernels.errors import InvalidSplitError
from bullet_kernels.partition import SMSplit, grant_green, grant_tpc


def test_split_is_an_immutable_hashable_key():
    a, b = SMSplit(prefill=96, decode=36), SMSplit(prefill=96, decode=36)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != SMSplit(decode=36, prefill=96)  # lane order is part of the key (carving order)
    assert a.key == "prefill96-decode36" and a.total == 132 and a["decode"] == 36
    with pytest.raises(AttributeError):
        a.foo = 1


@pytest.mark.parametrize("bad, msg", [
    (dict(prefill=0), "at least 1"),
    (dict(prefill=-8), "at least 1"),
    (dict(prefill=8.0), "positive int"),
    (dict(prefill=True), "positive int"),
    (dict(), "at least one lane"),
    (dict(Prefill=8), "not allowed"),
])
def test_bad_counts_are_refused_with_the_rule(bad, msg):
    with pytest.raises(InvalidSplitError, match=msg):
        SMSplit(**bad)


def test_parse_round_trips_and_rejects_garbage():
    assert SMSplit.parse("prefill=96,decode=36") == SMSplit(prefill=96, decode=36)
    assert SMSplit.parse("prefill=100,decode=40+overlap").overlap
    with pytest.raises(InvalidSplitError, match="lane=SMS"):
        SMSplit.parse("prefill:96")
    with pytest.raises(KeyError, match="lanes: prefill"):
        SMSplit(prefill=8)["decode"]


def test_parse_refuses_a_lane_named_twice():
    with pytest.raises(InvalidSplitError, match="lane 'prefill' appears twice in split 'prefill=96,prefill=10'"):
        SMSplit.parse("prefill=96,prefill=10")
    with pytest.raises(InvalidSplitError, match="appears twice"):
        SMSplit.parse("decode=8, decode =8+overlap")


def test_green_rounds_to_eight_and_gives_the_remainder():
    assert grant_green(SMSplit(prefill=96, decode=36), 132) == {"prefill": 96, "decode": 36}
    assert grant_green(SMSplit(decode=16, prefill=116), 132) == {"decode": 16, "prefill": 116}
    assert grant_green(SMSplit(prefill=116, decode=16), 132) == {"prefill": 116, "decode": 16}
    assert grant_green(SMSplit(decode=30), 132) == {"decode": 32}
    assert grant_green(SMSplit(decode=3), 132) == {"decode": 8}
    assert grant_green(SMSplit(decode=132), 132) == {"decode": 132}


def test_green_refuses_oversubscription_overlap_and_too_many():
    with pytest.raises(InvalidSplitError, match="does not fit 132 SMs"):
        grant_green(SMSplit(prefill=100, decode=36), 132)
    with pytest.raises(InvalidSplitError, match="this GPU has 132"):
        grant_green(SMSplit(decode=140), 132)
    with pytest.raises(InvalidSplitError, match="cannot overlap"):
        grant_green(SMSplit(prefill=100, decode=40, overlap=True), 132)
    with pytest.raises(InvalidSplitError, match="whole GPU"):
        grant_green(SMSplit(prefill=132, decode=8), 132)


def test_tpc_rounds_to_two_and_allows_explicit_overlap():
    with pytest.raises(InvalidSplitError, match="asks for 134 SMs"):
        grant_tpc(SMSplit(prefill=95, decode=37), 132)  # 96 + 38 after rounding to TPCs
    assert grant_tpc(SMSplit(prefill=95, decode=35), 132) == {"prefill": 96, "decode": 36}
    assert grant_tpc(SMSplit(decode=1), 132) == {"decode": 2}
    with pytest.raises(InvalidSplitError, match="overlap=True"):
        grant_tpc(SMSplit(prefill=100, decode=40), 132)
    assert grant_tpc(SMSplit(prefill=100, decode=40, overlap=True), 132) == {"prefill": 100, "decode": 40}
    with pytest.raises(InvalidSplitError, match="exactly two lanes"):
        grant_tpc(SMSplit(a=100, b=40, c=20, overlap=True), 132)
    with pytest.raises(InvalidSplitError, match="this GPU has 132"):
        grant_tpc(SMSplit(decode=134), 132)
