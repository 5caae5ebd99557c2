import pytest

from tests.oracle import SPEC_TABLE
from tenvoo_fast import AdapterError
from tenvoo_fast.methods.channels import (FACTOR_TABLE, check_factors, default_factors,
                                       general_factors)


def test_table_reproduced_exactly():
    assert FACTOR_TABLE == SPEC_TABLE
    for c, f in SPEC_TABLE.items():
        assert default_factors(c) == f


@pytest.mark.parametrize("c", list(range(1, 300)) + [320, 640, 1000, 1536, 2048, 4093])
def test_general_rule_multiplies_out_and_is_ordered(c):
    f = general_factors(c)
    assert f[0] * f[1] * f[2] == c
    assert f[0] >= f[1] >= f[2] >= 1


def test_general_rule_is_most_balanced():
    assert general_factors(1000) == (10, 10, 10)
    assert general_factors(7) == (7, 1, 1)
    assert general_factors(10) == (5, 2, 1)
    assert general_factors(320) == (8, 8, 5)


def test_overrides_win():
    assert default_factors(64, {64: (4, 4, 4)}) == (4, 4, 4)


def test_bad_factorisation_names_layer_and_numbers():
    with pytest.raises(AdapterError, match=r"down\.conv.*\[4, 4, 3\].*48.*64"):
        check_factors((4, 4, 3), 64, layer="down.conv", side="input")
    with pytest.raises(AdapterError, match="three positive integers"):
        check_factors((4, 16), 64, layer="x", side="output")
