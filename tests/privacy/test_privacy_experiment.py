"""experiments/privacy.py end to end on the digits CNN (slow: two Ray simulations)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import privacy  # noqa: E402


def test_row_overrides_per_defense():
    assert privacy.row_overrides("none", 2, 3.0, "image") == ["model.cut=2"]
    assert privacy.row_overrides("dp-n0.5", 1, 3.25, "image") == [
        "model.cut=1", "privacy.act-clip=3.25", "privacy.act-noise=0.5"]
    assert privacy.row_overrides("dpsgd-n1", 1, 3.0, "image", 0.5) == [
        "model.cut=1", "model.norm=group", "privacy.sgd-clip=0.5", "privacy.sgd-noise=1.0"]
    assert privacy.row_overrides("dpsgd-n1-dp-n1", 2, 3.0, "text")[1:] == [
        "privacy.sgd-clip=1", "privacy.sgd-noise=1.0", "privacy.act-clip=3",
        "privacy.act-noise=1.0"]
    assert privacy.row_overrides("none-gn", 1, 3.0, "image") == ["model.cut=1",
                                                                 "model.norm=group"]
    assert privacy.row_overrides("dpsgd-n0.7-cgn", 4, 3.0, "image") == [
        "model.cut=4", "model.norm=client-group", "privacy.sgd-clip=1", "privacy.sgd-noise=0.7"]
    assert privacy.row_overrides("none-cgn", 4, 3.0, "text") == ["model.cut=4"]
    fwe = privacy.row_overrides("dpsgd-n1-fwe", 1, 3.0, "text")
    assert fwe[:3] == ["model.cut=1", "privacy.sgd-clip=1", "privacy.sgd-noise=1.0"]
    assert fwe[3].startswith("train.trainable=[layer.*, head,")
    assert privacy.applies("dpsgd-n1-fwe", "text") and not privacy.applies("dpsgd-n1-fwe",
                                                                            "image")
    assert privacy.applies("none-cgn", "image") and not privacy.applies("none-cgn", "text")
    text = privacy.row_overrides("topk10-2bit", 3, 1.0, "text")
    assert text[1].startswith("codec.up=[drop-padding, {name: topk-mask") and len(text) == 2
    klt = privacy.row_overrides("kltec136-rs20", 1, 1.0, "text")
    assert klt[1:] == ["codec.up=[drop-padding, {name: klt-ec, bits: 1.36}]",
                       "codec.down=[drop-padding, {name: row-sampling, fraction: 0.2}, rotate, "
                       "sign]"]
    drop = privacy.row_overrides("drop70-1bit", 1, 1.0, "image")
    assert drop[1] == drop[2].replace("codec.down", "codec.up")  # the same positions both ways
    assert drop[1].startswith("codec.up=[{name: dropout, p: 0.7, rescale: true}")
    assert drop[3:] == ["eval.through-codec=true"] and "eval.through-codec=true" not in klt
    assert privacy.applies("kltec136-rs20", "text") and not privacy.applies("kltec136-rs20",
                                                                              "image")
    assert privacy.applies("drop70-1bit", "image") and not privacy.applies("drop70-1bit", "text")
    q8 = privacy.row_overrides("drop70-1bit-q8", 4, 1.0, "image")
    assert q8[1] == drop[1] and q8[3:] == drop[3:]
    assert q8[2] == ("codec.down=[{name: dropout, p: 0.7, rescale: true}, "
                     "{name: quantize, bits: 8}]")  # 1-bit up, the same mask, 8-bit down
    assert privacy.row_overrides("dpsgd-n2-fwe", 3, 1.0, "text")[1:3] == [
        "privacy.sgd-clip=1", "privacy.sgd-noise=2.0"]


@pytest.mark.slow
def test_privacy_table_on_digits(tmp_path, no_leftover_ray):
    out = tmp_path / "p"
    assert privacy.main(["--task", "digits", "--clients", "2", "--rounds", "1", "--rows",
                         "none", "dp-n1", "--cuts", "1", "--attack-steps", "100",
                         "--inversion-epochs", "3", "--aux-batches", "2", "--out", str(out),
                         "run.num-threads=1"]) == 0
    attacks = json.loads((out / "attacks.json").read_text())
    assert attacks["none-cut1"]["ssim"] > 0.9  # the harness is real
    assert attacks["dp-n1-cut1"]["ssim"] < 0.3  # and the defense shows
    assert attacks["none-cut1"]["direction_auc"] > 0.8
    table = (out / "privacy.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| none") or
            line.startswith("| dp-n1")]
    assert len(rows) == 2 and "| - |" not in rows[1].split("|", 6)[5]  # epsilon reported


def test_accuracy_of_a_row_evaluated_through_its_codec():
    rounds = [{"accuracy": 0.5}, {"accuracy": None}, {"accuracy": 0.6, "codec_accuracy": 0.55}]
    assert privacy.accuracy_cell(rounds) == "55.00% through codec (60.00% clean)"
    assert privacy.accuracy_cell([{"accuracy": 0.6}, {"accuracy": None}]) == "60.00%"
