"""Convolution, pooling and BatchNorm calls made again alone (lungbench.predict.kernels):
their signatures round-trip to tensors of the recorded shapes, and the ratio of two calls is
measured, cached and refused where a call cannot be made."""

from __future__ import annotations

import json

import pytest
import torch

from lungbench.measure.timing import OpCall, operator_counter
from lungbench.predict import kernels
from lungbench.predict.kernels import KernelRatios, call_runner, decode


def conv_calls(batch: int, channels: int, side: int = 8, channels_last: bool = False):
    """The forward and backward aten calls of one Conv3d step, as the recorder keeps them."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(channels, 2 * channels, 3, padding=1, bias=False)
    x = torch.randn(batch, channels, side, side, side, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    with operator_counter(record=True) as ops:
        conv(x).sum().backward()
    return {c.name: c for c in ops.calls if c.signature}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    return tmp_path / kernels.CACHE_FILE


def pool_norm_calls(batch: int = 2, channels: int = 4, side: int = 8):
    """The aten calls of one BatchNorm3d + MaxPool3d step, as the recorder keeps them."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.BatchNorm3d(channels), torch.nn.MaxPool3d(2))
    x = torch.randn(batch, channels, side, side, side, requires_grad=True)
    with operator_counter(record=True) as ops:
        layers(x).relu().sum().backward()
    return ops.calls


def test_convolutions_pooling_and_batchnorm_keep_a_signature_and_nothing_else():
    calls = conv_calls(2, 4)
    assert set(calls) == {"aten.convolution", "aten.convolution_backward"}
    signed = {c.name for c in pool_norm_calls() if c.signature}
    unsigned = {c.name for c in pool_norm_calls() if not c.signature}
    assert signed == {
        "aten.native_batch_norm",
        "aten.native_batch_norm_backward",
        "aten.max_pool3d_with_indices",
        "aten.max_pool3d_with_indices_backward",
    }
    assert "aten.relu" in unsigned and "aten.threshold_backward" in unsigned
    forward = json.loads(calls["aten.convolution"].signature)
    assert forward[0] == ["tensor", [2, 4, 8, 8, 8], "float32", False]
    assert forward[1] == ["tensor", [8, 4, 3, 3, 3], "float32", False]
    assert forward[2] is None and forward[-1] == 1  # no bias; groups


def test_signatures_decode_to_tensors_of_their_shapes_and_layouts():
    calls = conv_calls(2, 4, channels_last=True)
    args = [decode(a, torch.device("cpu")) for a in json.loads(calls["aten.convolution"].signature)]
    x, weight = args[0], args[1]
    assert x.shape == (2, 4, 8, 8, 8) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    assert weight.shape == (8, 4, 3, 3, 3)
    backward = call_runner(calls["aten.convolution_backward"], torch.device("cpu"))
    backward()  # the backward runs alone with its recorded output mask


def test_pooling_and_batchnorm_calls_get_a_ratio_made_alone(cache, monkeypatch):
    real = kernels.timed
    # each call really made alone, its time planted: a call that cannot be made is None
    monkeypatch.setattr(kernels, "timed", lambda run, threads: real(run, threads) and 1.0)
    small, large = pool_norm_calls(batch=2), pool_norm_calls(batch=4)
    signed = [(a, b) for a, b in zip(small, large, strict=True) if a.signature]
    assert len(signed) == 4
    for a, b in signed:
        assert KernelRatios(rounds=1).ratio(a, 1, b, 1) == 1.0, a.name


def test_a_max_pool_backward_alone_scatters_through_indices_its_forward_could_make():
    backward = next(
        c for c in pool_norm_calls() if c.name == "aten.max_pool3d_with_indices_backward"
    )
    args = [decode(a, torch.device("cpu")) for a in json.loads(backward.signature)]
    indices = kernels.pooled_indices(args)
    grad_output, x = args[0], args[1]
    assert indices.shape == grad_output.shape and indices.dtype == torch.int64
    # each index points at the largest element of its own 2x2x2 window of x
    pooled = torch.nn.functional.max_pool3d(x, 2)
    flat = x.flatten(2).gather(2, indices.flatten(2))
    assert torch.equal(flat.view_as(pooled), pooled)


def test_ratio_of_a_call_to_itself_is_one_without_timing(cache, monkeypatch):
    monkeypatch.setattr(kernels, "timed", lambda *a: pytest.fail("timed a call to itself"))
    call = conv_calls(2, 4)["aten.convolution"]
    assert KernelRatios().ratio(call, 1, call, 1) == 1.0
    relu = OpCall("aten.relu", 0.0, 1.0, "fp32")
    assert KernelRatios().ratio(relu, 1, relu, 2) is None  # no signature: the bounds scale it


def test_ratio_is_measured_alternated_and_cached(cache, monkeypatch):
    # 16 -> 32 channels on 16^3 voxels, batch 2 against 16 (not batch 1: oneDNN's batch-1
    # kernel here took 2.7x batch 2's time, the kind of thing kernels.py exists to measure)
    small = conv_calls(2, 16, side=16)["aten.convolution"]
    large = conv_calls(16, 16, side=16)["aten.convolution"]
    seen = []
    real = kernels.timed

    def planted(run, threads):  # each call really made, its time planted: no timing race
        seen.append(run)
        assert real(run, threads) > 0
        return {0: 0.012, 1: 0.001}[seen.index(run)]  # the target's call first, then the source's

    monkeypatch.setattr(kernels, "timed", planted)
    ratio = KernelRatios(rounds=3).ratio(small, 1, large, 1)
    assert len(seen) == 6 and seen[0] is not seen[1] and seen[0] is seen[2]  # alternated
    assert ratio == pytest.approx(12.0)  # the target's time over the source's
    assert cache.is_file()
    monkeypatch.setattr(kernels, "timed", lambda *a: pytest.fail("not from the cache"))
    assert KernelRatios().ratio(small, 1, large, 1) == ratio  # the same answer, cached
    monkeypatch.setattr(kernels, "timed", lambda run, threads: 0.5 if threads == 2 else 1.0)
    assert KernelRatios(fresh=True).ratio(small, 1, large, 2) == 0.5  # --remeasure measures


def test_a_call_that_cannot_be_made_alone_has_no_ratio(cache):
    good = conv_calls(2, 4)["aten.convolution"]
    args = json.loads(good.signature)
    args[1][1] = [8, 5, 3, 3, 3]  # a weight whose channels do not match the input's
    bad = OpCall(good.name, good.flops, good.bytes, good.dtype, signature=json.dumps(args))
    assert KernelRatios().ratio(good, 1, bad, 1) is None
