import chex
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.layers.masking import mask_tokens


def test_zeroes_masked_tokens_on_every_trailing_axis_and_drops_non_finite_values():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2) + 1
    x[0, 0, 0, 0] = np.nan
    x[1, 2, 1, 1] = np.inf
    mask = np.array([[False, True, True], [True, True, False]])
    y = mask_tokens(jnp.asarray(x), jnp.asarray(mask))
    chex.assert_shape(y, x.shape)
    np.testing.assert_array_equal(np.asarray(y), np.where(mask[:, :, None, None], x, 0.0))
    assert mask_tokens(x, None) is x
    with pytest.raises(ValueError, match="token_mask"):
        mask_tokens(jnp.asarray(x), jnp.ones((2, 3, 1), bool))
