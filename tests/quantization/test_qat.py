import pytest
import torch
from torch import nn

from fedsplit.pruning import MaskEnforcer, compute_masks, structured_prune
from fedsplit.quantization import (
    ActivationFakeQuant,
    QATConv2d,
    QATLinear,
    QuantizationError,
    convert_int8,
    fake_quant_weight,
    freeze_observers,
    is_qat_key,
    load_float_state,
    prepare_qat,
    strip_qat_state,
    to_float,
)


def _qat_layers(module):
    return [m for m in module.modules() if isinstance(m, (QATLinear, QATConv2d))]


def test_prepare_swaps_layers_and_keeps_weight_keys(bert_segment, cnn_segment):
    for segment, n_layers in ((bert_segment, 12), (cnn_segment, 3)):
        float_keys = set(segment.state_dict())
        qat = prepare_qat(segment)
        assert len(_qat_layers(qat)) == n_layers
        assert not _qat_layers(segment)  # not in place by default
        keys = set(qat.state_dict())
        extra = keys - float_keys
        assert float_keys <= keys
        assert extra == {f"{name}.input_fake_quant.{leaf}" for name, m in qat.named_modules()
                         if isinstance(m, (QATLinear, QATConv2d))
                         for leaf in ("min_val", "max_val", "observed")}
        assert all(is_qat_key(k) for k in extra)
        assert set(strip_qat_state(qat.state_dict())) == float_keys
        for key in float_keys:  # same values
            assert torch.equal(qat.state_dict()[key], segment.state_dict()[key])


def test_inplace_reuses_parameters(cnn_segment):
    params = [id(p) for p in cnn_segment.parameters()]
    qat = prepare_qat(cnn_segment, inplace=True)
    assert qat is cnn_segment and [id(p) for p in qat.parameters()] == params


def test_forward_backward_and_ste_gradients(bert_segment, cnn_segment):
    for segment, batch in ((bert_segment, torch.randint(0, 100, (4, 6))),
                           (cnn_segment, torch.randn(4, 1, 8, 8))):
        qat = prepare_qat(segment)
        out = qat(batch)
        (out @ torch.randn(out.shape[-1])).pow(2).mean().backward()
        for layer in _qat_layers(qat):
            assert layer.weight.grad is not None and torch.count_nonzero(layer.weight.grad) > 0
        optimizer = torch.optim.SGD(qat.parameters(), lr=0.1)
        before = _qat_layers(qat)[0].weight.detach().clone()
        optimizer.step()
        assert not torch.equal(before, _qat_layers(qat)[0].weight)


def test_weight_fake_quant_grid_and_straight_through():
    w = torch.randn(6, 10, requires_grad=True)
    q = fake_quant_weight(w, 8)
    scale = w.detach().abs().amax(1, keepdim=True) / 127.5  # (6, 1): per output channel
    codes = q.detach() / scale
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.min() >= -128 - 1e-4 and codes.max() <= 127 + 1e-4
    assert bool(((q - w).abs() <= scale / 2 + 1e-6).all())  # nearest, incl. the clipped max
    upstream = torch.randn(6, 10)
    (q * upstream).sum().backward()
    inside = w.detach().abs() < w.detach().abs().amax(1, keepdim=True)  # not clipped
    assert torch.equal(w.grad[inside], upstream[inside])  # STE: identity gradient


def test_activation_observer_ema_and_freeze():
    fq = ActivationFakeQuant(bits=8, momentum=0.5)
    fq(torch.tensor([-1.0, 3.0]))
    assert (fq.min_val.item(), fq.max_val.item()) == (-1.0, 3.0)
    fq(torch.tensor([-3.0, 1.0]))
    assert (fq.min_val.item(), fq.max_val.item()) == (-2.0, 2.0)  # halfway
    fq.eval()
    fq(torch.tensor([-10.0, 10.0]))  # eval: frozen
    assert (fq.min_val.item(), fq.max_val.item()) == (-2.0, 2.0)
    fq.train()
    freeze_observers(fq)
    out = fq(torch.linspace(-5, 5, 1000))
    assert fq.min_val.item() == -2.0
    step = 4.0 / 255  # the rounded zero point may shift the grid by up to one step
    assert out.min() >= -2.0 - step and out.max() <= 2.0 + step  # clipped to the range
    assert out.unique().numel() <= 256
    with pytest.raises(QuantizationError):
        prepare_qat(nn.Linear(2, 2), bits=9)


def test_load_float_state_and_to_float(bert_segment):
    qat = prepare_qat(bert_segment)
    qat(torch.randint(0, 100, (2, 5)))  # observers now hold a range
    observed = {k: v.clone() for k, v in qat.state_dict().items() if is_qat_key(k)}
    new_weights = {k: v + 1.0 if v.is_floating_point() else v
                   for k, v in strip_qat_state(qat.state_dict()).items()}
    load_float_state(qat, new_weights)
    state = qat.state_dict()
    assert all(torch.equal(state[k], v) for k, v in new_weights.items())
    assert all(torch.equal(state[k], v) for k, v in observed.items())
    with pytest.raises(QuantizationError, match="missing"):
        load_float_state(qat, {"layers.0.attention.self.query.weight": torch.zeros(32, 32)})
    plain = to_float(qat)
    assert not _qat_layers(plain) and set(plain.state_dict()) == set(new_weights)


def test_qat_composes_with_pruning(bert_segment):
    qat = prepare_qat(bert_segment)
    masks = compute_masks(qat, 0.5)
    assert set(masks) == set(compute_masks(bert_segment, 0.5))  # same keys as the float segment
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-2)
    with MaskEnforcer(qat, masks, optimizer=optimizer):
        for _ in range(2):
            out = qat(torch.randint(0, 100, (4, 6)))
            optimizer.zero_grad()
            (out @ torch.randn(32)).pow(2).mean().backward()
            optimizer.step()
    assert all(torch.count_nonzero(qat.state_dict()[k][~m]) == 0 for k, m in masks.items())
    small, _ = structured_prune(qat, heads=0.5, ffn=0.5)
    assert isinstance(small.layers[0].attention.self.query, QATLinear)
    assert small(torch.randint(0, 100, (2, 5))).shape == (2, 5, 32)


def _calibrate_on(qat, batch):
    """Set every activation range to this batch's (what dynamic int8 does per batch)."""
    for m in qat.modules():
        if isinstance(m, ActivationFakeQuant):
            m.momentum = 1.0
    with torch.no_grad():
        qat.train()
        qat(batch)
    qat.eval()


def test_int8_inference_matches_fake_quant(bert_segment):
    qat = prepare_qat(bert_segment, momentum=0.1)
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-2)
    target = torch.randn(32)
    for _ in range(3):  # a short QAT run
        out = qat(torch.randint(0, 100, (8, 12)))
        optimizer.zero_grad()
        (out @ target).pow(2).mean().backward()
        optimizer.step()
    ids = torch.randint(0, 100, (8, 12))
    _calibrate_on(qat, ids)
    int8 = convert_int8(qat)
    dyn = torch.ao.nn.quantized.dynamic.Linear
    linears = [m for m in int8.modules() if isinstance(m, (nn.Linear, dyn))]
    assert len(linears) == 12 and all(isinstance(m, dyn) for m in linears)
    # int8 weights are exactly the grid QAT trained on
    q_layer, i_layer = qat.layers[1].intermediate.dense, int8.layers[1].intermediate.dense
    assert i_layer.weight().dtype == torch.qint8
    assert torch.equal(i_layer.weight().dequantize(), fake_quant_weight(q_layer.weight.detach()))
    with torch.no_grad():
        fake, real = qat(ids), int8(ids)
    assert ((real - fake).norm() / fake.norm()) < 2e-3
    assert _qat_layers(qat)  # the QAT segment itself is untouched


def test_int8_cnn_runs_linear_in_int8(cnn_segment):
    qat = prepare_qat(cnn_segment)
    x = torch.randn(8, 1, 8, 8)
    _calibrate_on(qat, x)
    int8 = convert_int8(qat)
    assert isinstance(int8[2][1], torch.ao.nn.quantized.dynamic.Linear)
    assert type(int8[0][0]) is nn.Conv2d  # convs stay float (no dynamic int8 conv in torch)
    with torch.no_grad():
        fake, real = qat(x), int8(x)
    assert ((real - fake).norm() / fake.norm()) < 5e-2
