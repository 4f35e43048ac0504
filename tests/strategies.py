"""Hypothesis strategies shared by the property tests."""

from hypothesis import strategies as st

seeds = st.integers(min_value=0, max_value=2**64 - 1)
kinds = st.sampled_from(["rademacher", "gaussian", "sjlt"])
small_k = st.integers(min_value=1, max_value=300)
rows = st.integers(min_value=1, max_value=9)
chunk_len = st.integers(min_value=1, max_value=700)
offsets = st.one_of(st.integers(min_value=0, max_value=5000), st.integers(min_value=2**32 - 300, max_value=2**40))


@st.composite
def splits(draw, length: int):
    """Sorted cut points splitting range(length) into contiguous chunks (possibly empty ones)."""
    cuts = draw(st.lists(st.integers(min_value=0, max_value=length), max_size=5))
    return [0, *sorted(cuts), length]
