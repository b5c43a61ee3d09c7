"""The CPU formulations (leo_jax.layers.conv, Linear's 2-D matmul, unrolled layer loops) compute what the native ops
compute, values and gradients in fp32, and are used on CPU only: a trace that targets TPU keeps the native ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leo_jax.layers import common, conv


def _conv_reference(x, kernel, stride, padding, groups):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _value_and_grads(fn, *args):
    # A non-linear read-out so every output position weighs differently in the gradients.
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * jnp.cos(fn(*a))),
                                      argnums=tuple(range(len(args)))))(*args)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("shape,k,padding", [((3, 11, 9, 5), 7, 3), ((2, 8, 8, 4), 3, 1), ((2, 6, 7, 3), 3, 0),
                                             ((2, 5, 5, 3), 3, 2)])
def test_depthwise_conv_equals_grouped_convolution(shape, k, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, shape[-1])), jnp.float32)
    value, grads = _value_and_grads(lambda a, w: conv.depthwise_conv(a, w, padding), x, kernel)
    ref_value, ref_grads = _value_and_grads(lambda a, w: _conv_reference(a, w, 1, padding, shape[-1]), x, kernel)
    assert abs(float(value - ref_value)) <= 1e-5 * abs(float(ref_value)) + 1e-4
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and _rel(got, want) < 5e-6


@pytest.mark.parametrize("shape,p", [((2, 16, 16, 3), 4), ((2, 17, 18, 3), 4), ((1, 9, 9, 5), 2)])
def test_patch_conv_equals_strided_convolution(shape, p):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((p, p, shape[-1], 6)), jnp.float32)
    value, grads = _value_and_grads(conv.patch_conv, x, kernel)
    ref_value, ref_grads = _value_and_grads(lambda a, w: _conv_reference(a, w, p, 0, 1), x, kernel)
    assert abs(float(value - ref_value)) <= 1e-5 * abs(float(ref_value)) + 1e-4
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 5e-6


def test_linear_on_cpu_equals_dot_general_values_and_gradients():
    layer = common.Linear((4, 6), (3, 5), in_axes=("a", "b"), out_axes=("c", "d"), use_bias=True, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 7, 4, 6)), jnp.float32)
    value, (state_grads, x_grad) = _value_and_grads(lambda st, a: nnx.merge(graphdef, st)(a), state, x)
    ref_value, ref_grads = _value_and_grads(lambda w, b, a: jnp.einsum("ntab,abcd->ntcd", a, w) + b,
                                            state["kernel"][...], state["bias"][...], x)
    assert abs(float(value - ref_value)) < 1e-5
    for got, want in zip((state_grads["kernel"][...], state_grads["bias"][...], x_grad), ref_grads):
        assert got.shape == want.shape and _rel(got, want) < 1e-6


def _primitives(fn, *args) -> set[str]:
    """Every primitive name in the jaxpr of fn's gradient, nested jaxprs included."""
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            if eqn.primitive.name == "scan":
                names.add(f"scan(unroll={eqn.params['unroll']})")
            if eqn.primitive.name == "dot_general":
                names.add(f"dot_general(rank={eqn.invars[0].aval.ndim})")
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))))(*args).jaxpr)
    return names


def test_the_cpu_formulations_are_used_on_cpu_only(monkeypatch):
    """On CPU: shifted sums for the depthwise convolution, 2-D matmuls, unrolled layer loops. A trace that targets
    TPU (an AOT compile) keeps the grouped convolution, the N-D dot_general and the scan loop."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((7, 7, 1, 4)), jnp.float32)
    stack = common.stack_layers(lambda r: common.Linear(4, 4, in_axes=("a",), out_axes=("b",), rngs=r), 3,
                                nnx.Rngs(0))

    def layers(x):
        return common.scan_layers(stack, lambda layer, h, _: (layer(h), None), x)[0]

    cpu_conv, cpu_layers = _primitives(lambda a, w: conv.depthwise_conv(a, w, 3), x, kernel), _primitives(layers, x)
    assert "conv_general_dilated" not in cpu_conv
    assert "dot_general(rank=4)" not in cpu_layers and "scan(unroll=3)" in cpu_layers, cpu_layers
    for module in (common, conv):
        monkeypatch.setattr(module, "target_platform", lambda: "tpu")
    tpu_conv, tpu_layers = _primitives(lambda a, w: conv.depthwise_conv(a, w, 3), x, kernel), _primitives(layers, x)
    assert "conv_general_dilated" in tpu_conv
    assert "dot_general(rank=4)" in tpu_layers and "scan(unroll=1)" in tpu_layers, tpu_layers
