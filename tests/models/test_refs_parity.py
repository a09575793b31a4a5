"""Parity with the official PyTorch LlamaCanon outputs in tests/data/refs (see PROVENANCE.md)."""

import chex
import jax
import numpy as np

from canon_jax.interop import load_hf_checkpoint


def test_forward_matches_official_logits(refs_dir):
    d = refs_dir / "llama_canon" / "canon_abcd"
    model, params = load_hf_checkpoint(str(d))
    ids = np.load(d / "inputs.npz")["input_ids"]
    expected = np.load(d / "expected.npz")["logits"]
    logits = jax.jit(model.apply)({"params": params}, ids)
    chex.assert_shape(logits, expected.shape)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_forward_matches_official_logits_scanned(refs_dir):
    d = refs_dir / "llama_canon" / "canon_abcd"
    model, params = load_hf_checkpoint(str(d), scan_layers=True, remat="full")
    ids = np.load(d / "inputs.npz")["input_ids"]
    expected = np.load(d / "expected.npz")["logits"]
    logits = jax.jit(model.apply)({"params": params}, ids)
    chex.assert_shape(logits, expected.shape)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
