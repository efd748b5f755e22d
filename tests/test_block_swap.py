"""Block swap: blocks kept in host memory and copied in just before they run give the same result whatever the number
of swapped blocks. On the CPU the host is the compute device, so swapping is a no-op there; `force=True` sends the
swapped blocks through the same copy-and-call path, which is what these tests check (no GPU here)."""

import pytest
import torch
import torch.nn as nn

from omnisync_core.errors import InputError
from omnisync_core.model.block_swap import BlockSwap
from omnisync_core.model.wan_i2v import WanI2VDiT, load_wan_i2v, wan_i2v_config


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = WanI2VDiT(wan_i2v_config("tiny", num_layers=4)).eval().requires_grad_(False)   # as loaded models are
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] in (16, 24, 40) else 0.0))
    return m


def inputs(batch=2):
    torch.manual_seed(1)
    t = 3
    return (torch.randn(batch, 16, t, 4, 6), torch.tensor([0.7, 0.3][:batch]), torch.randn(batch, 6, 32),
            torch.randn(1, 257, 16), torch.randn(1, 20, t, 4, 6), torch.randn(batch, 9, 5, 3, 8))


def run(m, swap):
    m.block_swap = swap
    try:
        with torch.no_grad():
            return m(*inputs())
    finally:
        m.block_swap = None


def test_same_output_with_any_number_of_swapped_blocks(model):
    """Every block count 0..4 through the copy path gives the unswapped result bit for bit (same values, same
    kernels, fresh aligned copies), the host weights stay where they were, and each swapped block is copied once."""
    plain = run(model, None)
    ptrs = [p.data_ptr() for p in model.parameters()]
    for n in range(len(model.blocks) + 1):
        swap = BlockSwap(model.blocks, n, "cpu", force=True)
        assert torch.equal(run(model, swap), plain)
        assert swap.fetches == n and [swap.is_swapped(i) for i in range(4)] == [i < n for i in range(4)]
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_cpu_swap_is_a_no_op_without_force(model):
    swap = BlockSwap(model.blocks, 3, "cpu")
    assert not swap.active and torch.equal(run(model, swap), run(model, None)) and swap.fetches == 0
    plain = run(model, None)
    swap = model.set_block_swap(2, "cpu", force=True)
    with torch.no_grad():
        assert torch.equal(model(*inputs()), plain)
    assert swap.num_swapped == 2 and swap.fetches == 2
    assert model.set_block_swap(0, "cpu") is None and model.block_swap is None


def test_any_module_and_keyword_arguments():
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))
    x = torch.randn(2, 8)
    want = x
    for b in blocks:
        want = b(want)
    swap = BlockSwap(blocks, 2, "cpu", force=True)
    got = x
    for i, b in enumerate(blocks):
        got = swap.run(i, b, input=got)
    assert torch.equal(got, want) and swap.fetches == 2


def test_bad_count_is_refused(model):
    for n in (-1, 5):
        with pytest.raises(InputError, match="0..4"):
            BlockSwap(model.blocks, n, "cpu")


def test_loader_places_swapped_blocks_on_the_host(model):
    """load_wan_i2v(swap_blocks=N) keeps blocks 0..N-1 on the host; on the CPU the swap is inactive and the output is
    the plain model's."""
    m = load_wan_i2v(dict(model.state_dict()), swap_blocks=2)
    assert isinstance(m.block_swap, BlockSwap) and m.block_swap.num_swapped == 2 and not m.block_swap.active
    assert all(p.device.type == "cpu" for p in m.parameters())
    with torch.no_grad():
        assert torch.equal(m(*inputs()), run(model, None))
