"""The native kernels give the same bits on any number of threads (the worker pool of kernels/spin_pool.cpp
splits the output blocks or heads; each is computed by the same code), whether the workers were spinning or
asleep when the call came. The rest of the suite runs with one thread (conftest), which never starts a worker."""
import time

import pytest
import torch
from torch import nn

from mobilevlm.fast import native
from mobilevlm.fast.quantize import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels are not built here")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _calls():
    torch.manual_seed(0)
    int8 = Int8Linear.from_linear(nn.Linear(256, 16 * 37, bias=False))  # 37 blocks: uneven parts
    int4 = Int4Linear.from_linear(nn.Linear(256, 64 * 3, bias=False), 64)
    int8.pack()
    int4.pack()
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    q = torch.randn(12, 64)
    k = torch.randn(4, 40, 64).bfloat16()
    v = torch.randn(4, 40, 64).bfloat16()
    return {
        "int8, 1 token": lambda: int8(x[:1]),
        "int8, 5 tokens": lambda: int8(x),
        "int4, 5 tokens": lambda: int4(x),
        "attention": lambda: torch.ops.mobilevlm_attention.decode(q, k, v, 33, 0.125),
    }


@pytest.mark.parametrize("count", [2, 3])
def test_any_thread_count_gives_the_single_thread_bits(threads, count):
    calls = _calls()
    threads(1)
    expected = {name: call() for name, call in calls.items()}
    threads(count)
    for pause in (0.0, 0.002, 0.0):  # back to back (workers spinning), after they fell asleep, and again
        time.sleep(pause)
        for name, call in calls.items():
            assert torch.equal(call(), expected[name]), (name, count, pause)
