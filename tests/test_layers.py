"""Hand-written VJPs in vlm_jax/model/layers.py against autodiff and float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures_numerics import assert_f32_close
from vlm_jax.model import layers


def _inputs(dtype, seed=0):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(3, 5, 16), dtype)
  kernel = jnp.asarray(rng.randn(16, 24) * 0.3, jnp.float32)
  g = jnp.asarray(rng.randn(3, 5, 24), jnp.float32)
  return x, kernel, g


@pytest.mark.parametrize("in_shape,out_shape", [
    ((16,), (24,)),  # [D] -> [F]: fc1, gate_up
    ((4, 6), (24,)),  # [H, hd] -> [D]: the output projections (n_in=2)
    ((16,), (4, 6)),  # [D] -> [H, hd]: q/k/v (n_out=2)
    ((4, 6), (3, 8)),  # both: every contraction and output axis in its own place
])
def test_matmul_float32_gradients_equal_autodiff(in_shape, out_shape):
  """Forward and both gradients equal autodiff of the einsum, for kernels [*in, *out] with 1 or 2 axes each."""
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(3, 5, *in_shape), jnp.float32)
  kernel = jnp.asarray(rng.randn(*in_shape, *out_shape) * 0.3, jnp.float32)
  g = jnp.asarray(rng.randn(3, 5, *out_shape), jnp.float32)
  letters_in, letters_out = "ij"[:len(in_shape)], "op"[:len(out_shape)]
  spec = f"bs{letters_in},{letters_in}{letters_out}->bs{letters_out}"
  ours = jax.vjp(lambda x, k: layers.matmul(x, k, len(in_shape)), x, kernel)
  ref = jax.vjp(lambda x, k: jnp.einsum(spec, x, k), x, kernel)
  assert ours[0].shape == (3, 5, *out_shape)
  assert_f32_close(ours[0], ref[0])
  (dx, dk), (ref_dx, ref_dk) = ours[1](g), ref[1](g)
  assert dx.shape == x.shape and dk.shape == kernel.shape and dk.dtype == jnp.float32
  assert_f32_close(dx, ref_dx)
  assert_f32_close(dk, ref_dk)


def test_matmul_float32_out_keeps_the_accumulator():
  """bf16 x: the default output is rounded to bf16; float32_out returns the float32 sums of the bf16 products
  (float64 numpy of the same bf16 values agrees to float32 rounding), and its gradients arrive in bf16 / f32."""
  x, kernel, g = _inputs(jnp.bfloat16)
  exact = np.einsum("bsi,io->bso", np.asarray(x, np.float64), np.asarray(kernel.astype(jnp.bfloat16), np.float64))
  rounded = layers.matmul(x, kernel, 1)
  y, vjp = jax.vjp(lambda x, k: layers.matmul(x, k, 1, True), x, kernel)
  assert rounded.dtype == jnp.bfloat16 and y.dtype == jnp.float32
  np.testing.assert_allclose(y, exact, rtol=1e-6, atol=1e-5)
  assert np.max(np.abs(np.asarray(rounded, np.float64) - exact)) > 1e-3  # bf16 rounding is visible
  dx, dk = vjp(g)
  assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
  g16 = np.asarray(g.astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(dk, np.einsum("bsi,bso->io", np.asarray(x, np.float64), g16), rtol=1e-5, atol=1e-5)


def test_scale_features_gradients():
  rng = np.random.RandomState(1)
  scale = jnp.asarray(rng.randn(16), jnp.float32)
  x, _, _ = _inputs(jnp.float32)
  g = jnp.asarray(rng.randn(3, 5, 16), jnp.float32)
  ours = jax.vjp(layers.scale_features, x, scale)
  ref = jax.vjp(lambda x, s: s * x, x, scale)
  np.testing.assert_array_equal(ours[0], ref[0])
  for a, b in zip(ours[1](g), ref[1](g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # bf16: the scale's gradient is the float32 sum of the exact products of the bf16 values.
  x16, g16 = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  y, vjp = jax.vjp(layers.scale_features, x16, scale)
  assert y.dtype == jnp.bfloat16
  dx, dscale = vjp(g16)
  assert dx.dtype == jnp.bfloat16 and dscale.dtype == jnp.float32
  exact = np.sum(np.asarray(g16, np.float64) * np.asarray(x16, np.float64), axis=(0, 1))
  np.testing.assert_allclose(dscale, exact, rtol=1e-5, atol=1e-5)


def test_unembed_gradients():
  """The tied output head x . table^T: float32 gradients equal autodiff; with bf16 x, under jit (where
  `matmul(x, table.T)` failed on XLA:CPU: "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"),
  the output and the table's [V, D] gradient are the float32 sums of the bf16 products (float64 numpy)."""
  x, kernel, g = _inputs(jnp.float32)
  table = kernel.T  # [V=24, D=16]
  ours = jax.vjp(layers.unembed, x, table)
  ref = jax.vjp(lambda x, t: jnp.einsum("bsd,vd->bsv", x, t), x, table)
  assert_f32_close(ours[0], ref[0])
  for a, b in zip(ours[1](g), ref[1](g)):
    assert_f32_close(a, b)

  x16 = x.astype(jnp.bfloat16)
  y, (dx, dtable) = jax.jit(lambda x, t, g: (layers.unembed(x, t), jax.vjp(layers.unembed, x, t)[1](g)))(
      x16, table, g)
  assert y.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dtable.dtype == jnp.float32
  x64, t64 = np.asarray(x16, np.float64), np.asarray(table.astype(jnp.bfloat16), np.float64)
  g64 = np.asarray(g.astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(y, np.einsum("bsd,vd->bsv", x64, t64), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(dtable, np.einsum("bsv,bsd->vd", g64, x64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx, np.float64), np.einsum("bsv,vd->bsd", g64, t64), rtol=1e-2, atol=1e-2)


def _swiglu64(g, u, d):
  """silu(g) * u and its gradients (d . dgate, d . dup) in float64."""
  s = 1 / (1 + np.exp(-g))
  return g * s * u, d * u * s * (1 + g * (1 - s)), d * g * s


def _within_bf16_rounding(got, want, what=""):
  """|got - want| <= 1 bf16 ulp of want (round-to-nearest gives half of that; per-op rounding gives more), plus
  float32's absolute error where the value cancels to near 0 (the derivative's zero crossing)."""
  got = np.asarray(got, np.float64)
  np.testing.assert_array_less(np.abs(got - want), 2.0 ** -7 * np.abs(want) + 1e-5, err_msg=what)


def test_swiglu_float32_equals_autodiff_and_bf16_rounds_once():
  rng = np.random.RandomState(0)
  g, u, d = (jnp.asarray(rng.randn(4, 64) * 3, jnp.float32) for _ in range(3))
  ours = jax.vjp(layers.swiglu, g, u)
  ref = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)
  assert_f32_close(ours[0], ref[0])
  for a, b in zip(ours[1](d), ref[1](d)):
    assert_f32_close(a, b)

  g16, u16, d16 = (t.astype(jnp.bfloat16) for t in (g, u, d))
  y, (dg, du) = jax.jit(lambda g, u, d: (layers.swiglu(g, u), jax.vjp(layers.swiglu, g, u)[1](d)))(g16, u16, d16)
  assert y.dtype == dg.dtype == du.dtype == jnp.bfloat16
  for got, want in zip((y, dg, du), _swiglu64(*(np.asarray(t, np.float64) for t in (g16, u16, d16)))):
    _within_bf16_rounding(got, want)



def test_add_bias_gradient_is_the_sum_over_positions_in_the_output_dtype():
  rng = np.random.RandomState(1)
  y = jnp.asarray(rng.randn(3, 40, 4, 8), jnp.float32)
  bias = jnp.asarray(rng.randn(4, 8), jnp.float32)  # two feature dims, like q_proj's [heads, head_dim]
  g = jnp.asarray(rng.randn(3, 40, 4, 8), jnp.float32)
  out, vjp = jax.vjp(lambda y, b: layers.add_bias(y, b, 2), y, bias)
  ref_out, ref_vjp = jax.vjp(lambda y, b: y + b, y, bias)
  np.testing.assert_array_equal(out, ref_out)
  (dy, db), (ref_dy, ref_db) = vjp(g), ref_vjp(g)
  np.testing.assert_array_equal(dy, ref_dy)
  np.testing.assert_allclose(db, ref_db, rtol=1e-5, atol=1e-5)

  y16, g16 = y.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  dy16, db16 = jax.jit(lambda y, b, g: jax.vjp(lambda y, b: layers.add_bias(y, b, 2), y, b)[1](g))(y16, bias, g16)
  assert dy16.dtype == jnp.bfloat16 and db16.dtype == jnp.float32
  np.testing.assert_array_equal(dy16, g16)
  assert np.array_equal(np.asarray(db16), np.asarray(db16.astype(jnp.bfloat16).astype(jnp.float32)))  # bf16 values
  _within_bf16_rounding(db16, np.asarray(g16, np.float64).sum(axis=(0, 1)))
