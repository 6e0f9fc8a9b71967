"""Data-parallel training: under ``accelerate launch`` on two GPUs (skipped elsewhere) each rank
loads its own quantized base, the ranks split every optimizer step's examples, and the run equals a
one-GPU run with the same global batch, step by step. The same holds for two CPU processes
(``torchrun``, gloo), which keeps the data-parallel code paths under test on machines without GPUs."""

import pytest
import torch
from launch import one_vs_two


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("trainer", ["native", "hf"])
def test_two_gpu_data_parallel_equals_one_gpu_run(tiny_config, tmp_path, trainer):
    _, two, a, b = one_vs_two(tiny_config, tmp_path, trainer, quantizer="bnb-nf4", device="cuda", steps=6, examples=24)
    # bf16 compute, gradients averaged across ranks in another order: bf16 noise, not a different run
    assert max(abs(x - y) for x, y in zip(a, b)) <= 2e-2 * a[0], (a, b)
    assert b[-1] < b[0]
    assert two["reload_max_abs_logit_diff"] < 5e-2  # rank 0 saved an adapter that reloads


@pytest.mark.parametrize("trainer", ["native", "hf"])
def test_two_cpu_processes_data_parallel_equal_one_process(tiny_config, tmp_path, trainer):
    _, _, a, b = one_vs_two(tiny_config, tmp_path, trainer, quantizer="none", device="cpu", steps=4, examples=16, cpu=True)
    # float32: the ranks' gradients are averaged in another order than one process sums them
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4 * a[0], (a, b)
