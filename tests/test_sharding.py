"""Sharded forward and decoding equal the single-device result on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config, tiny_params
from ppow_jax import sharding
from ppow_jax.inference.autoregressive import AutoregressiveDecoder
from ppow_jax.models import llama

MESHES = [dict(data=8), dict(fsdp=4, tensor=2), dict(data=2, tensor=4)]
CONFIG = tiny_config(num_heads=8, num_kv_heads=4, head_dim=8, hidden_size=64, intermediate_size=128)
PARAMS = tiny_params(CONFIG)
PROMPTS = [[3 + i, 7, 11 + 2 * i, 5][: 2 + i % 3] for i in range(8)]


@pytest.fixture(scope="module")
def single_device_reference():
    tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, CONFIG.vocab_size)
    logits = jax.jit(lambda p, t: llama.forward(p, t, llama.init_cache(CONFIG, 8, 12), CONFIG).logits)(PARAMS, tokens)
    generated = AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[]).generate(PROMPTS, 10).tokens
    return tokens, logits, generated


def test_eight_fake_devices_available():
    assert len(jax.devices()) >= 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_sharded_forward_and_decoding_equal_single_device(axes, single_device_reference):
    tokens, ref_logits, ref_generated = single_device_reference
    mesh = sharding.make_mesh(**axes)
    param_sh = sharding.param_shardings(PARAMS, mesh)
    params = jax.device_put(PARAMS, param_sh)
    cache = llama.init_cache(CONFIG, 8, 12)
    cache_sh = sharding.cache_shardings(cache, mesh)
    fn = jax.jit(lambda p, t, c: llama.forward(p, t, c, CONFIG).logits,
                 in_shardings=(param_sh, sharding.batch_sharding(mesh, tokens.shape), cache_sh),
                 out_shardings=sharding.batch_sharding(mesh, ref_logits.shape))
    with jax.set_mesh(mesh):
        logits = fn(params, tokens, jax.device_put(cache, cache_sh))
    assert len(logits.sharding.device_set) == 8
    # Sharded reductions sum in another order: compare relative to the logits' scale.
    assert float(jnp.max(jnp.abs(logits - ref_logits)) / jnp.max(jnp.abs(ref_logits))) < 1e-5

    generated = AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[], mesh=mesh).generate(PROMPTS, 10).tokens
    assert generated == ref_generated


def test_parameters_are_actually_split():
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(PARAMS, mesh))
    assert specs["layers"][0]["wqkv"] == jax.sharding.PartitionSpec("fsdp", "tensor", None, None)
    assert specs["layers"][0]["w_gate_up"] == jax.sharding.PartitionSpec("fsdp", None, "tensor")
    assert specs["layers"][0]["w_down"] == jax.sharding.PartitionSpec("tensor", "fsdp")
    # An axis the mesh cannot divide evenly stays replicated (3 heads over tensor=2).
    spec = sharding.logical_to_spec(("batch", "cache_seq", "kv_heads", "head_dim"), (8, 16, 3, 8),
                                    {"data": 1, "fsdp": 1, "tensor": 2})
    assert spec == jax.sharding.PartitionSpec(None, None, None, None)


def test_mesh_needs_enough_devices():
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=16)
