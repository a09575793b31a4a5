"""The static mixer table, the layers -> models import direction, and where every Canon layer sits in each model."""

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax.traverse_util import flatten_dict

from canon_jax.config import ModelConfig
from canon_jax.layers.attention import Attention
from canon_jax.layers.gdn import GDNMixer
from canon_jax.layers.gla import GLAMixer
from canon_jax.layers.mamba2 import Mamba2Mixer
from canon_jax.models import CausalLM, registry

LAYERS = pathlib.Path(__file__).resolve().parents[2] / "canon_jax" / "layers"


def test_builtin_mixers_are_in_the_static_table():
    assert registry.registered_mixers() == ("gdn", "gla", "llama", "mamba2")
    for arch, cls in (("llama", Attention), ("gla", GLAMixer), ("gdn", GDNMixer), ("mamba2", Mamba2Mixer)):
        assert registry.get_mixer(arch) is cls


def test_layers_never_import_models():
    """The models import the layers (the mixer table); the other direction would be a cycle."""
    files = sorted(LAYERS.glob("*.py"))
    assert len(files) > 5, LAYERS
    offenders = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{f.name}: {n}" for n in names if n.startswith("canon_jax.models")]
    assert offenders == []


# parameter path (inside layers_0) -> (kernel shape, logical axes of the kernel, has bias), d = 16, 2 heads
D = 16
CANON_SITES = {
    "llama": {
        ("canon_a",): ((4, D), "embed", False),
        ("mixer", "canon_b"): ((4, 3 * D), "qkv", False),
        ("canon_c",): ((4, D), "embed", False),
        ("mlp", "canon_d"): ((4, 2 * 24), "mlp", False),
    },
    "gla": {
        ("canon_a",): ((4, D), "embed", False),
        ("mixer", "q_conv1d"): ((4, D), "key", False),
        ("mixer", "k_conv1d"): ((4, D), "key", False),
        ("mixer", "v_conv1d"): ((4, 2 * D), "value", False),
        ("mixer", "canon_b"): ((4, 4 * D), "qkv", False),
        ("canon_c",): ((4, D), "embed", False),
        ("mlp", "canon_d"): ((4, 2 * 24), "mlp", False),
    },
    "mamba2": {
        ("canon_a",): ((4, D), "embed", False),
        ("mixer", "canon_b"): ((4, 4 * D + 2 * 8 + 2), "qkv", False),
        ("mixer", "conv1d"): ((4, 2 * D + 2 * 8), "qkv", True),
        ("canon_c",): ((4, D), "embed", False),
        ("mlp", "canon_d"): ((4, 2 * 24), "mlp", False),
    },
}
CANON_SITES["gdn"] = CANON_SITES["gla"]


@pytest.mark.parametrize("arch", ["llama", "gla", "gdn", "mamba2"])
def test_canon_parameter_paths_and_axes(arch):
    """Checkpoints and the HF import/export address the Canon weights by these paths."""
    letters = "ABCD" if arch == "llama" else "AbBCD"
    cfg = ModelConfig(
        arch=arch, vocab_size=11, hidden_size=D, num_layers=1, num_heads=2, intermediate_size=24, canon_set=letters
    )
    cfg = cfg.replace(ssm_state_size=8) if arch == "mamba2" else cfg
    boxed = jax.eval_shape(lambda: CausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32)))["params"]
    layer = flatten_dict(boxed["layers_0"], is_leaf=lambda k, v: isinstance(v, nn.meta.AxisMetadata))
    sites = {path[:-1] for path in layer if path[-1] in ("kernel", "bias") and path[-2] in _conv_names()}
    assert sites == set(CANON_SITES[arch])
    for site, (shape, axis, has_bias) in CANON_SITES[arch].items():
        kernel = layer[site + ("kernel",)]
        assert kernel.names == ("conv_kernel", axis), site
        assert nn.meta.unbox(kernel).shape == shape, site
        assert (site + ("bias",) in layer) == has_bias, site


def _conv_names():
    return {"canon_a", "canon_b", "canon_c", "canon_d", "q_conv1d", "k_conv1d", "v_conv1d", "conv1d"}
