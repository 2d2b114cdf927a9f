import math

import pytest
import torch

from selfheal_ext import ops, reference
from conftest import DEVICES, DTYPES, HAS_CUDA, assert_no_worse_than_eager

ACTIVATIONS = ["identity", "relu", "gelu", "silu"]

# The CPU kernel runs direct loops up to DIRECT_MAX multiply-adds (positions *
# rank * (C_in + C_out)), and up to DIRECT_MAX_LOW_RANK for rank <= 4 forward
# and rank <= 8 backward; above, BLAS products over tiles of positions
# (csrc/cpu/adapter_direct_cpu.cpp, adapter_direct_fits).
DIRECT_MAX = 2 ** 22
DIRECT_MAX_LOW_RANK = 2 ** 24


def cpu_paths(x_shape, channels_first, rank, c_out=None):
    """("direct" or "tiled" for the forward, the same for the backward)."""
    c_in = x_shape[1] if channels_first else x_shape[-1]
    positions = math.prod(x_shape) // c_in
    work = positions * rank * (c_in + (c_in if c_out is None else c_out))

    def path(low_rank):
        limit = DIRECT_MAX_LOW_RANK if rank <= low_rank else DIRECT_MAX
        return "direct" if work <= limit else "tiled"

    return path(4), path(8)


# (x shape, channels_first, rank)
SHAPES = [
    ((1, 8), False, 1),           # batch of one, rank 1
    ((4, 47, 31), False, 5),      # odd sizes, 3-D channels-last
    ((3, 1), False, 1),           # one channel
    ((2, 3, 64), False, 256),     # largest rank
    ((1, 8, 5), True, 3),         # channels-first 1-D spatial, batch of one
    ((2, 31, 7, 5), True, 4),     # channels-first conv map with odd sizes
    ((3, 1, 4, 4), True, 1),      # channels-first, one channel
    ((300, 4, 2, 2), True, 2),    # many small maps, blocks across samples
    ((2, 8, 1100), True, 3),      # a map longer than one block
    ((3, 5000), False, 2),        # wide: fewer positions per block
    ((2, 3000, 37), True, 1),     # wide: fewer positions per block, across samples
    ((500, 256), False, 16),      # just below the direct loops' limit
    ((2, 64, 1000), True, 16),    # just below the direct loops' limit
    ((1100, 256), False, 16),     # tiled: two tiles, the second short
    ((1100, 64, 2, 2), True, 16), # tiled: tiles group whole small maps
    ((2, 64, 1500), True, 16),    # tiled: a map longer than one tile, split
    ((2100, 128), False, 8),      # tiled forward, direct (low-rank) backward
    ((83, 16, 20, 20), True, 4),  # low rank: direct beyond DIRECT_MAX
]


def make_args(x_shape, channels_first, rank, dtype, device, *, c_out=None, full=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c_in = x_shape[1] if channels_first else x_shape[-1]
    c_out = c_in if c_out is None else c_out

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(*x_shape)
    args = dict(
        down_weight=rand(rank, c_in, scale=c_in ** -0.5),
        up_weight=rand(c_out, rank, scale=rank ** -0.5),
        down_bias=rand(rank, scale=0.1) if full else None,
        scale=rand(c_out) if full else None,
        shift=rand(c_out, scale=0.1) if full else None,
    )
    if c_out != c_in:
        y_shape = list(x_shape)
        y_shape[1 if channels_first else -1] = c_out
        args["base"] = rand(*y_shape)
    return x, args


def run_with_grads(fn, x, args, grad_seed=1, **kwargs):
    x = x.detach().clone().requires_grad_()
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in args.items()}
    y = fn(x, **leaves, **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
    names = ["x"] + [k for k, v in leaves.items() if v is not None]
    inputs = [x] + [v for v in leaves.values() if v is not None]
    grads = torch.autograd.grad(y, inputs, g)
    return y, dict(zip(names, grads))


def to_double(x, args):
    return x.double().cpu(), {k: (v.double().cpu() if v is not None else None) for k, v in args.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,channels_first,rank", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_adapter_matches_reference(device, dtype, x_shape, channels_first, rank, activation):
    x, args = make_args(x_shape, channels_first, rank, dtype, device)
    kw = dict(activation=activation, channels_first=channels_first)
    y, grads = run_with_grads(ops.adapter, x, args, **kw)
    y_eager, grads_eager = run_with_grads(reference.adapter, x, args, **kw)
    xd, argsd = to_double(x, args)
    y_oracle, grads_oracle = run_with_grads(reference.adapter, xd, argsd, **kw)
    assert y.dtype == dtype and y.shape == y_eager.shape
    assert_no_worse_than_eager(y, y_eager, y_oracle, dtype, "y")
    for name in grads_oracle:
        assert grads[name].dtype == dtype
        assert_no_worse_than_eager(grads[name], grads_eager[name], grads_oracle[name], dtype, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_first", [False, True], ids=["channels_last", "channels_first"])
@pytest.mark.parametrize("full", [False, True], ids=["plain", "bias_scale_shift"])
def test_adapter_lora_side_branch(device, channels_first, full):
    x_shape = (2, 12, 3, 5) if channels_first else (5, 3, 12)
    x, args = make_args(x_shape, channels_first, 4, torch.float32, device, c_out=20, full=full)
    kw = dict(activation="silu", channels_first=channels_first)
    y, grads = run_with_grads(ops.adapter, x, args, **kw)
    y_ref, grads_ref = run_with_grads(reference.adapter, *to_double(x, args), **kw)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name].double().cpu(), grads_ref[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_first", [False, True], ids=["channels_last", "channels_first"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_adapter_gradcheck_fp64(channels_first, activation):
    x_shape = (2, 5, 3, 2) if channels_first else (3, 2, 5)
    x, args = make_args(x_shape, channels_first, 3, torch.float64, "cpu")
    base = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    tensors = [x.requires_grad_()] + [args[k].requires_grad_() for k in
                                      ("down_weight", "up_weight", "down_bias", "scale", "shift")]

    def fn(x, down, up, bias, scale, shift, base):
        return ops.adapter(x, down, up, bias, scale, shift, base, activation, channels_first)

    assert torch.autograd.gradcheck(fn, (*tensors, None))
    assert torch.autograd.gradcheck(fn, (*tensors, base))


@pytest.mark.parametrize("device", DEVICES)
def test_adapter_non_contiguous_input(device):
    big = torch.randn(6, 40, device=device)
    x = big[:, ::2]  # [6, 20], stride 2 along channels
    assert not x.is_contiguous()
    _, args = make_args((6, 20), False, 4, torch.float32, device)
    torch.testing.assert_close(ops.adapter(x, **args), reference.adapter(x, **args))
    xcf = torch.randn(3, 5, 6, 7, device=device).transpose(2, 3)  # channels-first, strided
    _, args = make_args((3, 5, 7, 6), True, 2, torch.float32, device)
    torch.testing.assert_close(
        ops.adapter(xcf, **args, channels_first=True),
        reference.adapter(xcf, **args, channels_first=True),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_dormant_is_exact_identity(device, dtype):
    x, args = make_args((9, 33), False, 4, dtype, device)
    args["up_weight"] = torch.zeros_like(args["up_weight"])
    args["shift"] = torch.zeros_like(args["shift"])
    assert torch.equal(ops.adapter(x, **args), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_first", [False, True], ids=["channels_last", "channels_first"])
def test_adapter_empty_batch(device, channels_first):
    x_shape = (0, 6, 4) if channels_first else (0, 6)
    x, args = make_args(x_shape, channels_first, 2, torch.float32, device)
    y, grads = run_with_grads(ops.adapter, x, args, channels_first=channels_first)
    assert y.shape == x.shape
    for name, grad in grads.items():
        assert grad.shape == (x.shape if name == "x" else args[name].shape)
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("shape,channels_first", [
    ((3000, 64), False),
    ((1024, 16, 4, 4), True),  # small maps: tiles of whole samples, 16 chunks
    ((3, 16, 10000), True),    # long maps: tiles split one sample, several chunks
])
def test_adapter_weight_grads_are_deterministic_at_each_thread_count(shape, channels_first):
    # The tiled path. Chunk partials are fixed and added in order, so a rerun at
    # the same thread count is bit-identical. Across thread counts the BLAS
    # under the chunk products may block its sums differently (on a 16-core
    # host MKL moved the last bits of down_weight between 1 and 16 threads), so
    # there they agree to rounding only.
    assert cpu_paths(shape, channels_first, 16) == ("tiled", "tiled")
    x, args = make_args(shape, channels_first, 16, torch.float32, "cpu")
    threads = torch.get_num_threads()
    runs = {}
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            runs[count] = [run_with_grads(ops.adapter, x, args, channels_first=channels_first)[1] for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    one, many = runs[1][0], runs[max(2, threads)][0]
    for count, (first, again) in runs.items():
        for name in first:
            assert torch.equal(first[name], again[name]), (count, name)
    for name in one:
        torch.testing.assert_close(many[name], one[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,channels_first", [
    ((3000, 64), False),      # rows in 11 chunks
    ((256, 16, 4, 4), True),  # blocks across small maps, 4 chunks
    ((3, 16, 5000), True),    # blocks within long maps, 14 chunks
    ((7, 5), False),          # one block
])
def test_adapter_direct_path_is_bit_identical_at_any_thread_count(shape, channels_first, dtype):
    # The direct loops' chunks depend on the problem's size only and each sums in
    # a fixed order, so results do not depend on the thread count at all.
    assert cpu_paths(shape, channels_first, 8) == ("direct", "direct")
    x, args = make_args(shape, channels_first, 8, dtype, "cpu")
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, max(2, threads), 1, max(2, threads)):
            torch.set_num_threads(count)
            runs.append(run_with_grads(ops.adapter, x, args, channels_first=channels_first))
    finally:
        torch.set_num_threads(threads)
    y_first, grads_first = runs[0]
    for y, grads in runs[1:]:
        assert torch.equal(y, y_first)
        for name in grads_first:
            assert torch.equal(grads[name], grads_first[name]), name


# (x shape, channels_first, rank): each layout on each side of DIRECT_MAX
OPTION_SHAPES = [
    ((1, 9, 7, 3), True, 3),       # direct, batch of one
    ((13, 5, 11), False, 2),       # direct
    ((1100, 64, 2, 2), True, 16),  # tiled
    ((1100, 256), False, 16),      # tiled
]
OPTIONS = [(), ("down_bias",), ("scale",), ("shift",), ("down_bias", "scale", "shift")]


def assert_close_to_fp64(got, want, rtol, what):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * 0.1 * scale, msg=what)


@pytest.mark.parametrize("x_shape,channels_first,rank", OPTION_SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "bias", "scale", "shift", "all"])
@pytest.mark.parametrize("side_branch", [False, True], ids=["base_x", "base_given"])
@pytest.mark.parametrize("x_needs_grad", [True, False], ids=["grad_x", "frozen_x"])
def test_adapter_options_match_reference(x_shape, channels_first, rank, options, side_branch,
                                         x_needs_grad):
    c_in = x_shape[1] if channels_first else x_shape[-1]
    x, args = make_args(x_shape, channels_first, rank, torch.float32, "cpu",
                        c_out=c_in + 3 if side_branch else None)
    for name in ("down_bias", "scale", "shift"):
        if name not in options:
            args[name] = None
    kw = dict(activation="gelu", channels_first=channels_first)
    y_shape = reference.adapter(x, **args, **kw).shape
    g = torch.randn(y_shape, generator=torch.Generator().manual_seed(1))

    def forward_backward(fn, x, args):
        x = x.detach().clone().requires_grad_(x_needs_grad)
        leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if v is not None}
        y = fn(x, **leaves, **kw)
        inputs = ([x] if x_needs_grad else []) + list(leaves.values())
        grads = torch.autograd.grad(y, inputs, g.to(y.dtype))
        return y, dict(zip((["x"] if x_needs_grad else []) + list(leaves), grads))

    y, grads = forward_backward(ops.adapter, x, args)
    y_ref, grads_ref = forward_backward(reference.adapter, *to_double(x, args))
    assert_close_to_fp64(y, y_ref, 1e-5, "y")
    assert grads.keys() == grads_ref.keys()
    for name, want in grads_ref.items():
        assert_close_to_fp64(grads[name], want, 1e-4, name)


@pytest.mark.parametrize("x_shape,channels_first,rank", OPTION_SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_adapter_fp64_matches_reference(x_shape, channels_first, rank, activation):
    # float64 arithmetic throughout (scalar erf/exp in the direct loops)
    x, args = make_args(x_shape, channels_first, rank, torch.float64, "cpu")
    kw = dict(activation=activation, channels_first=channels_first)
    y, grads = run_with_grads(ops.adapter, x, args, **kw)
    y_ref, grads_ref = run_with_grads(reference.adapter, x, args, **kw)
    assert y.dtype == torch.float64
    assert_close_to_fp64(y, y_ref, 1e-10, "y")
    for name, want in grads_ref.items():
        assert grads[name].dtype == torch.float64
        assert_close_to_fp64(grads[name], want, 1e-10, name)


def _raw_forward(x, args, activation="gelu", channels_first=False, base=None):
    return torch.ops.selfheal.adapter_forward(
        x, base, args["down_weight"], args["down_bias"], args["up_weight"],
        args["scale"], args["shift"], activation, channels_first,
    )


@pytest.mark.parametrize(
    "mutate,argument",
    [
        (lambda x, a: a.update(down_weight=a["down_weight"][0]), "down_weight"),
        (lambda x, a: a.update(down_weight=a["down_weight"][:, :-1]), "down_weight"),
        (lambda x, a: a.update(down_weight=torch.zeros(257, 16)), "down_weight"),
        (lambda x, a: a.update(up_weight=a["up_weight"].half()), "up_weight"),
        (lambda x, a: a.update(up_weight=a["up_weight"][:, :-1]), "up_weight"),
        (lambda x, a: a.update(down_bias=torch.zeros(7)), "down_bias"),
        (lambda x, a: a.update(scale=torch.zeros(3)), "scale"),
        (lambda x, a: a.update(shift=torch.zeros(16, 1)), "shift"),
        (lambda x, a: a.update(up_weight=torch.zeros(20, 4), scale=None, shift=None), "base"),
    ],
)
def test_adapter_bad_arguments_name_the_argument(mutate, argument):
    x, args = make_args((5, 16), False, 4, torch.float32, "cpu")
    mutate(x, args)
    with pytest.raises(RuntimeError, match=f"'{argument}'"):
        _raw_forward(x, args)


def test_adapter_check_messages_say_what_was_expected():
    # The messages are built only when a check fails; they still name the
    # argument, what was expected and what was given.
    x, args = make_args((5, 16), False, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"'down_weight' must be 2-D \[rank, 16\] with "
                                           r"1 <= rank <= 256, got Float tensor of shape \[4, 15\]"):
        _raw_forward(x, dict(args, down_weight=torch.zeros(4, 15)))
    with pytest.raises(RuntimeError, match=r"'up_weight' must be of the dtype of 'x' \(Float\), "
                                           r"got Half tensor"):
        _raw_forward(x, dict(args, up_weight=args["up_weight"].half()))
    with pytest.raises(RuntimeError, match=r"'shift' must be a 1-D tensor of length 16, got"):
        _raw_forward(x, dict(args, shift=torch.zeros(3)))
    y, hidden = _raw_forward(x, args)
    with pytest.raises(RuntimeError, match=r"'hidden' must be a Float tensor of shape \[5, 4\]"):
        torch.ops.selfheal.adapter_backward(y, x, hidden[1:], args["down_weight"],
                                            args["up_weight"], None, "gelu", False, True, True)


def test_adapter_bad_x_and_activation():
    x, args = make_args((5, 16), False, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="'x'"):
        _raw_forward(x.long(), args)
    with pytest.raises(RuntimeError, match="'activation'"):
        _raw_forward(x, args, activation="tanh")
    with pytest.raises(RuntimeError, match="'base'"):
        _raw_forward(x, args, base=torch.zeros(5, 15))
    with pytest.raises(RuntimeError, match="'x'"):
        _raw_forward(torch.zeros(16), args, channels_first=True)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_adapter_cuda_rejects_mixed_devices():
    x, args = make_args((5, 16), False, 4, torch.float32, "cuda")
    args["up_weight"] = args["up_weight"].cpu()
    with pytest.raises(RuntimeError, match="'up_weight'"):
        _raw_forward(x, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_shape,channels_first,rank", [
    ((4, 6), False, 3),
    ((2, 6, 3), True, 3),
    ((1100, 256), False, 16),     # tiled on the CPU
    ((1100, 64, 2, 2), True, 16),  # tiled on the CPU
])
def test_adapter_opcheck(device, x_shape, channels_first, rank):
    x, args = make_args(x_shape, channels_first, rank, torch.float32, device)
    x.requires_grad_()
    for value in args.values():
        if value is not None:
            value.requires_grad_()
    torch.library.opcheck(
        torch.ops.selfheal.adapter_forward.default,
        (x, None, args["down_weight"], args["down_bias"], args["up_weight"], args["scale"],
         args["shift"], "gelu", channels_first),
    )
    y, hidden = torch.ops.selfheal.adapter_forward(
        x.detach(), None, args["down_weight"].detach(), None, args["up_weight"].detach(),
        None, None, "relu", channels_first)
    torch.library.opcheck(
        torch.ops.selfheal.adapter_backward.default,
        (torch.randn_like(y), x.detach(), hidden, args["down_weight"].detach(),
         args["up_weight"].detach(), args["scale"].detach(), "relu", channels_first, True, True),
    )


@pytest.mark.parametrize("channels_first", [False, True], ids=["channels_last", "channels_first"])
def test_adapter_frozen_input_grads(channels_first):
    # Test-time adaptation: x comes from frozen layers and needs no gradient.
    x_shape = (3, 6, 4, 2) if channels_first else (7, 6)
    x, args = make_args(x_shape, channels_first, 3, torch.float32, "cpu")
    leaves = {k: v.requires_grad_() for k, v in args.items() if v is not None}
    y = ops.adapter(x, **args, channels_first=channels_first)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(leaves.values()), g)
    xd, argsd = to_double(x, args)
    leaves_d = {k: v.requires_grad_() for k, v in argsd.items() if v is not None}
    y_ref = reference.adapter(xd, **argsd, channels_first=channels_first)
    grads_ref = torch.autograd.grad(y_ref, list(leaves_d.values()), g.double())
    for name, got, want in zip(leaves, grads, grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("channels_first", [False, True], ids=["channels_last", "channels_first"])
def test_adapter_under_autocast_runs_in_fp32(channels_first):
    x_shape = (4, 8, 3, 3) if channels_first else (16, 8)
    x, args = make_args(x_shape, channels_first, 4, torch.float32, "cpu")
    x16 = x.bfloat16().requires_grad_()
    leaves = {k: v.requires_grad_() for k, v in args.items() if v is not None}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.adapter(x16, **args, channels_first=channels_first)
        grads = torch.autograd.grad(y.sum(), [x16, *leaves.values()])
    assert y.dtype == torch.float32
    y_ref = reference.adapter(x16.detach().float(), **args, channels_first=channels_first)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert grads[0].dtype == torch.bfloat16 and all(torch.isfinite(g).all() for g in grads)
