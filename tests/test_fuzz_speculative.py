"""A few cases of the differential fuzz (fuzz_speculative.py; run it for hundreds): random
models, drafters and trees whose speculative and PrefixCache runs must give plain decoding's
tokens. The cases are picked to cover tp 2, a draft with a padded vocabulary on a k-ary tree,
retrieval on a dynamic tree, the target drafting for itself on Medusa-style choices up to the
cache's last slot, and PrefixCache sessions of one and of three rows."""

import pytest

from fuzz_speculative import prefix_case, speculative_case


@pytest.mark.parametrize("number", [5, 8, 18])
def test_speculative_case(number):
    description, failure = speculative_case(number)
    assert failure is None, f"{description}: {failure}"


@pytest.mark.parametrize("number", [0, 34])  # one row; three rows, tp 2, a draft model's tree
def test_prefix_case(number):
    description, failure = prefix_case(number)
    assert failure is None, f"{description}: {failure}"
