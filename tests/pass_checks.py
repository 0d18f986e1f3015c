"""Checks shared by the pass tests: counters reset per test, interpreter results unchanged."""
import pytest
import torch

from fuselm import ir
from fuselm.passes import counters


@pytest.fixture(autouse=True)
def fresh_counters():
    torch.manual_seed(0)
    counters.clear()


def same_results(before, after, *inputs):
    """`after` verifies and computes what `before` computes, on the reference interpreter."""
    ir.verify(after)
    expected, got = ir.interpret(before, *inputs), ir.interpret(after, *inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
