"""The built-in synthetic data: deterministic per (seed, index), distinct, in [0, 1]."""
import torch

from tenvoo_fast.ddpm.phantoms import brain_phantoms


def test_phantoms_are_deterministic_distinct_and_in_unit_range():
    a, b = brain_phantoms(2, 16, seed=3), brain_phantoms(2, 16, seed=3)
    assert a.shape == (2, 1, 16, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, brain_phantoms(2, 16, seed=4))
    assert not torch.equal(a[0], a[1])
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.1
    assert torch.equal(brain_phantoms(1, 16, seed=3), a[:1])  # volume i depends on (seed, i)
