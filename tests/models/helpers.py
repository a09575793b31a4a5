"""Test helpers shared by the model/interop/generation tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


def random_params(model, seed, scale=0.3):
    """Random values for every parameter of ``model`` (norm scales around 1, so that no weight is trivially 1 or 0).

    Shapes come from ``jax.eval_shape`` of the init, so no compilation is needed (keeps the tests fast on a busy CPU).
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    flat = flatten_dict(nn.unbox(shapes))
    rng = np.random.default_rng(seed)
    out = {}
    for path, a in sorted(flat.items()):
        r = rng.normal(size=a.shape) * scale
        out[path] = jnp.asarray(1.0 + r if path[-1] == "scale" else r, jnp.float32)
    return unflatten_dict(out)
