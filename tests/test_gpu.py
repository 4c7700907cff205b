"""The GPU paths of `drgn train`, `drgn encode` and `drgn volumes`, checked against the CPU.

These run where CUDA is present (bench/gpu_check.sh runs them on any CUDA machine) and are skipped
elsewhere, CI included. The CPU is the reference: the same model must give the same loss, latents and
maps on the GPU in fp32 (up to the fp16 storage of the images on the GPU), and close ones under bf16
autocast; the fp16 stack held on the GPU and the pinned-memory stream must serve the same batches; and a
run trained on the GPU must resume there and load on a CPU-only machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_train import render

from drgn_core.cli import main
from drgn_core.data import ParticleData, open_particles
from drgn_core.io.mrc import read_mrc
from drgn_core.io.table import read_table
from drgn_core.models import HalfLattice, load_model
from drgn_core.train import evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
SMALL = ["--zdim", "1", "--enc-dim", "64", "--enc-layers", "2", "--dec-dim", "64", "--dec-layers", "2",
         "--lr", "1e-3", "--val-frac", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return render(tmp_path_factory.mktemp("gpu"), n=400, D=24, kind="continuous", snr=1.0, apix=6.0, seed=5)


@pytest.fixture(scope="module")
def cpu_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cpu"
    assert main(["train", str(data.table), str(data.stack), "-o", str(out), "--epochs", "2", *SMALL,
                 "--device", "cpu", "--precision", "fp32"]) == 0
    return out


def _particles(data, device: torch.device, mode: str, norm: float = 3.0, chunk: int = 64) -> ParticleData:
    table = read_table(data.table)
    return ParticleData(open_particles(data.stack, table), table, np.arange(7, 400, 3), HalfLattice(24), norm,
                        device, mode=mode, chunk=chunk, progress=False)


def test_gpu_holds_the_stack_in_fp16_and_the_stream_serves_the_same_batches(data):
    mem, st, ref = _particles(data, CUDA, "memory"), _particles(data, CUDA, "stream"), _particles(
        data, torch.device("cpu"), "memory")
    assert mem.y.device.type == "cuda" and mem.y.dtype == torch.float16 and st.y is None
    order = st.epoch_order(np.arange(mem.n), seed=2, epoch=1)
    bm, bs, bc = (list(d.batches(order, 16, start=5)) for d in (mem, st, ref))
    assert len(bm) == len(bs) == len(bc) == int(np.ceil((mem.n - 5) / 16))
    scale = ref.y.abs().max().item()
    for a, b, c in zip(bm, bs, bc):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.pos, c.pos)
        assert a.y.device.type == b.y.device.type == "cuda" and a.y.dtype == b.y.dtype == torch.float32
        assert torch.equal(a.y, b.y)  # both fp16-rounded the same values
        torch.testing.assert_close(a.y.cpu(), c.y, rtol=0, atol=1e-3 * scale)  # fp16: 11 bits of mantissa
        torch.testing.assert_close(a.ctf.cpu(), c.ctf, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.A.cpu(), c.A)


def test_the_loss_on_the_gpu_equals_the_cpu_loss(cpu_run, data):
    model, cfg = load_model(cpu_run)
    on_cpu = _particles(data, torch.device("cpu"), "memory", cfg.norm_scale)
    pos = np.arange(on_cpu.n)
    ref = evaluate(model, on_cpu, pos, 1.0, None)
    model = model.to(CUDA)
    on_gpu = _particles(data, CUDA, "memory", cfg.norm_scale)
    fp32 = evaluate(model, on_gpu, pos, 1.0, None)
    bf16 = evaluate(model, on_gpu, pos, 1.0, torch.bfloat16)
    for key in ("loss", "mse", "kl"):
        assert fp32[key] == pytest.approx(ref[key], rel=2e-3), key
        assert bf16[key] == pytest.approx(ref[key], rel=3e-2), key


def test_encode_and_volumes_on_the_gpu_match_the_cpu(cpu_run, data, tmp_path):
    out = tmp_path / "z_gpu.npy"
    assert main(["encode", str(cpu_run), str(data.table), str(data.stack), "-o", str(out), "--device", "cuda",
                 "--precision", "fp32"]) == 0
    z_cpu, z_gpu = np.load(cpu_run / "z.npy"), np.load(out)
    np.testing.assert_allclose(z_gpu, z_cpu, atol=2e-3 * max(1.0, np.abs(z_cpu).max()))
    for dev in ("cpu", "cuda"):
        assert main(["volumes", str(cpu_run), "-o", str(tmp_path / dev), "--z=-0.5,0.7",
                     "--device", dev]) == 0
    for name in ("vol_000.mrc", "vol_001.mrc"):
        a, _ = read_mrc(tmp_path / "cpu" / name, mmap=False)
        b, _ = read_mrc(tmp_path / "cuda" / name, mmap=False)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())


def test_a_gpu_run_resumes_and_its_model_loads_on_the_cpu(data, tmp_path):
    out = tmp_path / "gpu"
    base = ["train", str(data.table), str(data.stack), "-o", str(out), *SMALL, "--device", "cuda"]
    assert main([*base, "--epochs", "3", "--data-mode", "stream", "--chunk", "96"]) == 0
    assert main([*base, "--epochs", "6", "--data-mode", "stream", "--chunk", "96", "--resume"]) == 0
    log = np.genfromtxt(out / "train_log.csv", delimiter=",", names=True)
    assert list(log["epoch"]) == [1, 2, 3, 4, 5, 6] and np.isfinite(log["loss"]).all()
    assert log["peak_mem_MiB"][-1] > 0
    payload = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert payload["precision"] == expected and payload["epochs"] == 6
    model, _ = load_model(out, device="cpu")  # a GPU-trained model on a CPU-only machine
    assert all(p.device.type == "cpu" for p in model.parameters())
    z_cpu = tmp_path / "z_cpu.npy"
    assert main(["encode", str(out), str(data.table), str(data.stack), "-o", str(z_cpu),
                 "--device", "cpu"]) == 0
    # the same latents from the CPU (bf16 on both sides where the run used it: loose tolerance)
    z_ref = np.load(z_cpu)
    np.testing.assert_allclose(z_ref, np.load(out / "z.npy"), atol=0.05 * np.abs(z_ref).max())
    # it learnt (accuracy on the GPU is tests/test_train_accuracy.py's, which trains on the GPU where one is)
    assert log["loss"][-1] < 0.8 * log["loss"][0]
