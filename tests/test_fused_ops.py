"""Fused small row ops (scalar reference and AVX2) against plain torch."""
import pytest
import torch
import torch.nn.functional as F

from tp_numa import fused_ops

pytestmark = pytest.mark.skipif(not fused_ops.available(), reason="native ops not built")


@pytest.fixture(params=["scalar", "auto"])
def isa(request):
    torch.ops.tp_numa.set_kernel_isa(request.param)
    yield request.param
    torch.ops.tp_numa.set_kernel_isa("auto")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def torch_rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def torch_rope(x, cos, sin, neox):
    rd = 2 * cos.shape[1]
    rot, rest = x[..., :rd], x[..., rd:]
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        a, b = rot[..., : rd // 2], rot[..., rd // 2:]
        out = torch.cat([a * c - b * s, a * s + b * c], dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


@pytest.mark.parametrize("T,d", [(1, 896), (37, 640), (3, 13)])
def test_rms_norm(isa, T, d):
    x, w = rand(T, d, seed=1), rand(d, seed=2)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6), torch_rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,d", [(1, 896), (20, 1000)])
def test_add_rms_norm_updates_residual(isa, T, d):
    r, x, w = rand(T, d, seed=3), rand(T, d, seed=4), rand(d, seed=5)
    want_r = r + x
    y = fused_ops.add_rms_norm_(r, x, w, 1e-5)
    torch.testing.assert_close(r, want_r)
    torch.testing.assert_close(y, torch_rms_norm(want_r, w, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,d", [(1, 640), (11, 100)])
def test_add_rms_norm_with_sandwich_norm_of_x(isa, T, d):
    r, x, w, xw = rand(T, d, seed=9), rand(T, d, seed=10), rand(d, seed=11), rand(d, seed=12)
    want_r = r + torch_rms_norm(x, xw, 1e-6)
    y = fused_ops.add_rms_norm_(r, x, w, 1e-6, x_weight=xw)
    torch.testing.assert_close(r, want_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, torch_rms_norm(want_r, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("T,H,D,rd", [(1, 14, 64, 64), (9, 4, 256, 256), (5, 3, 64, 40), (2, 2, 24, 20)])
def test_rope_in_place_on_a_view(isa, neox, T, H, D, rd):
    # q as a view into a fused qkv row: non-trivial row stride
    qkv = rand(T, (H + 2) * D, seed=6)
    q = qkv[:, : H * D].view(T, H, D)
    ang = rand(T, rd // 2, seed=7)
    cos, sin = ang.cos(), ang.sin()
    want = torch_rope(q.clone(), cos, sin, neox)
    tail = qkv[:, H * D:].clone()
    fused_ops.rope_(q, cos, sin, neox)
    torch.testing.assert_close(q, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, H * D:], tail)  # the rest of the row untouched


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("T,f", [(1, 4864), (7, 2048), (2, 21)])
def test_act_mul(isa, gelu, T, f):
    gu = rand(T, 2 * f, seed=8) * 4
    gate, up = gu[:, :f], gu[:, f:]
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    torch.testing.assert_close(fused_ops.act_mul(gu, gelu), act * up, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    with pytest.raises(RuntimeError, match="w must be"):
        fused_ops.rms_norm(rand(2, 8), rand(7), 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        fused_ops.rms_norm(rand(2, 8).double(), rand(8), 1e-6)
    with pytest.raises(RuntimeError, match="2f"):
        fused_ops.act_mul(rand(2, 7), False)
    with pytest.raises(RuntimeError, match="cos/sin"):
        fused_ops.rope_(rand(2, 2, 8), rand(3, 4), rand(3, 4), True)


def test_opcheck():
    torch.library.opcheck(torch.ops.tp_numa.rms_norm.default, (rand(3, 16), rand(16), 1e-6))
    torch.library.opcheck(torch.ops.tp_numa.add_rms_norm_.default, (rand(3, 16), rand(3, 16, seed=1), rand(16), 1e-6))
    torch.library.opcheck(torch.ops.tp_numa.add_rms_norm_.default,
                          (rand(3, 16), rand(3, 16, seed=1), rand(16), 1e-6, rand(16, seed=2)))
    ang = rand(2, 4)
    torch.library.opcheck(torch.ops.tp_numa.rope_.default, (rand(2, 3, 8), ang.cos(), ang.sin(), True))
    torch.library.opcheck(torch.ops.tp_numa.act_mul.default, (rand(3, 16), False))
