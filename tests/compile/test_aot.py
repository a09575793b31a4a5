"""``canon_jax.aot``: topology names -> abstract devices, per-device HBM, meshes, and clear errors."""

import pytest

from canon_jax import aot

pytestmark = pytest.mark.compile


@pytest.mark.parametrize("name", ["v5e", "v5e:", "v5e:2xx", "v9:2x2", "h100:0x1x8", "cpu:1"])
def test_bad_target_names_raise(name):
    with pytest.raises(ValueError, match="CHIP:AxB"):
        aot.get_target(name)


def test_tpu_targets():
    pytest.importorskip("libtpu")
    one = aot.get_target("v5e:1x1")  # smaller than one host: the host bounds are set to the layout
    assert (one.platform, one.num_devices, one.hbm_bytes) == ("tpu", 1, 16 * aot.GiB)
    pod = aot.get_target("v5p:2x2x1")
    assert (pod.num_devices, pod.hbm_bytes, aot.platform_of(pod.devices)) == (4, 95 * aot.GiB, "tpu")
    mesh = aot.make_mesh(pod, (2, 2), ("data", "fsdp"))
    assert mesh.shape == {"data": 2, "fsdp": 2}
    with pytest.raises(ValueError, match="has 4"):
        aot.make_mesh(pod, (8,), ("data",))


def test_gpu_targets():
    pytest.importorskip("jax_cuda12_plugin")
    pytest.importorskip("nvidia.cuda_nvcc")
    host = aot.get_target("h200:1x1x8")
    assert (host.platform, host.num_devices, aot.platform_of(host.devices)) == ("gpu", 8, "gpu")
    assert host.hbm_bytes > 140e9  # from the shipped target description (H200: 141 GB)
    assert aot.get_target("h100:1x1x1").hbm_bytes == 84942979072
