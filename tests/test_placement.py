"""Placement of datasets on index primaries by rendezvous hashing: balanced, stable across
processes, and moving only what a joining primary wins or a leaving one held."""

import collections
import json
import subprocess
import sys

import pytest

from convsearch.placement import owner, parse_primaries, ranked

PRIMARIES = ["index-0.index:50053", "index-1.index:50053", "index-2.index:50053"]
NAMES = [f"dataset-{n}" for n in range(3000)]
# Hard-coded so that a change of the hash (which would strand every deployed dataset) fails here.
EXPECTED = {"shoes": "index-1.index:50053", "fashion": "index-2.index:50053", "cats": "index-2.index:50053",
            "products-2026": "index-2.index:50053"}


def placed(primaries: list[str]) -> dict[str, str]:
    return {name: owner(name, primaries) for name in NAMES}


def test_three_primaries_each_own_a_third_within_ten_percent():
    counts = collections.Counter(placed(PRIMARIES).values())
    assert set(counts) == set(PRIMARIES)
    for count in counts.values():
        assert abs(count - 1000) <= 100, counts


def test_owners_are_fixed_and_the_same_in_another_process():
    assert {name: owner(name, PRIMARIES) for name in EXPECTED} == EXPECTED
    code = ("import json, sys; from convsearch.placement import owner; "
            "print(json.dumps({n: owner(n, sys.argv[1].split(',')) for n in sys.argv[2:]}))")
    sample = NAMES[::97] + list(EXPECTED)
    # A fresh interpreter with another hash seed: the placement must not depend on hash().
    out = subprocess.run([sys.executable, "-c", code, ",".join(PRIMARIES), *sample], check=True, capture_output=True,
                         text=True, env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    assert json.loads(out) == {name: owner(name, PRIMARIES) for name in sample}


def test_the_order_primaries_are_given_in_does_not_matter():
    assert placed(PRIMARIES) == placed(list(reversed(PRIMARIES)))
    assert ranked("shoes", PRIMARIES)[0] == owner("shoes", PRIMARIES)
    assert sorted(ranked("shoes", PRIMARIES)) == sorted(PRIMARIES)


def test_a_fourth_primary_takes_about_a_quarter_and_only_to_itself():
    before, after = placed(PRIMARIES), placed([*PRIMARIES, "index-3.index:50053"])
    moved = [name for name in NAMES if before[name] != after[name]]
    assert {after[name] for name in moved} == {"index-3.index:50053"}
    assert abs(len(moved) - 750) <= 75, len(moved)


def test_removing_a_primary_moves_only_its_own_datasets():
    before, after = placed(PRIMARIES), placed(PRIMARIES[:2])
    moved = {name for name in NAMES if before[name] != after[name]}
    assert moved == {name for name in NAMES if before[name] == PRIMARIES[2]}


def test_primaries_are_parsed_from_a_comma_separated_list():
    assert parse_primaries(" a:1, b:2 ,") == ["a:1", "b:2"]
    assert parse_primaries("dns:///index:50053") == ["dns:///index:50053"]
    for bad in ("", " , ", "a:1,a:1"):
        with pytest.raises(ValueError):
            parse_primaries(bad)
