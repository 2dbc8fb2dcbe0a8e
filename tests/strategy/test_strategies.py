"""Every built-in strategy through the real ServerApp logic and ClientApp (in process).

On the digits CNN (no dropout) SFLV1, u-shaped with replicas, FedAvg of the whole model
and SFLV1 with mixed cuts all train *the same function with the same optimizer steps*,
so after a round their global models must agree to float precision: that pins down the
layer-wise averaging and the key bookkeeping of every mode.
"""

from __future__ import annotations

import json

import pytest

from fedsplit.channel import wire

SAMPLES = 320  # as tests/strategy/conftest.py runs them


def plans(grid) -> dict[int, dict]:
    return {m.metadata.dst_node_id: json.loads(str(m.content["config"]["client-plan"]))
            for m in grid.delivered if m.metadata.message_type == "train"}


@pytest.fixture(scope="module")
def sflv1(tmp_path_factory, run):
    writer, _ = run(tmp_path_factory.mktemp("ref"), "sflv1")
    return writer.rows[-1]


def check_bytes(row) -> None:
    assert row["cut_bytes_up"] == row["client_cut_bytes_up"]
    assert row["cut_bytes_down"] == row["client_cut_bytes_down"]
    assert row["bytes_up"] == row["cut_bytes_up"] + row["sync_bytes_up"]
    assert row["bytes_down"] == row["cut_bytes_down"] + row["sync_bytes_down"]
    assert row["examples"] == SAMPLES and row["failures"] == 0


@pytest.mark.parametrize("name,over,mode", [
    ("u-shaped", [], "u-shaped"),
    ("fedavg", [], "full"),
    ("sflv1", ["strategy.options={cuts: [1, 3]}"], "split"),
    ("splitfed", ["strategy.options={device-cuts: {laptop: 1, jetson-orin-nano: 3}}",
                  "fleet.profiles=configs/profiles/mixed_fleet.yaml",
                  "fleet.devices=[laptop, jetson-orin-nano]"], "split"),
])
def test_strategies_that_train_the_same_model_as_sflv1_agree_with_it(
        tmp_path, run, sflv1, name, over, mode):
    writer, grid = run(tmp_path, name, *over)
    row = writer.rows[-1]
    check_bytes(row)
    assert abs(row["loss"] - sflv1["loss"]) < 1e-5 and row["accuracy"] == sflv1["accuracy"]
    assert abs(row["train_loss"] - sflv1["train_loss"]) < 1e-5
    assert {p["mode"] for p in plans(grid).values()} == {mode}
    if mode == "full":
        assert row["cut_bytes_up"] == row["cut_bytes_down"] == 0
    if over:  # clients at cuts 1 and 3
        assert sorted(p["cut"] for p in plans(grid).values()) == [1, 3]
        assert row["cut_bytes_up"] != sflv1["cut_bytes_up"]


def test_sflv2_and_local_loss_train_and_count_their_frames(tmp_path, run,
                                                           sflv1):
    row2 = run(tmp_path, "sflv2")[0].rows[-1]
    check_bytes(row2)
    assert row2["loss"] != sflv1["loss"]  # one shared server segment: another trajectory
    writer, grid = run(tmp_path, "local-loss")
    row = writer.rows[-1]
    check_bytes(row)
    assert row["cut_bytes_up"] == row2["cut_bytes_up"]  # the same STEP frames go up
    loss_frame = len(wire.encode_frame(wire.Kind.LOSS, {"stats": wire.pack_f64(0, 0)}))
    ack = len(wire.encode_frame(wire.Kind.ACK, {}))
    assert row["cut_bytes_down"] == row["batches"] * loss_frame + 2 * ack  # no gradients
    clients = [json.loads(line) for line in (writer.dir / "clients.jsonl").read_text().splitlines()]
    assert all("aux-loss" in c and "aux-accuracy" in c for c in clients)
    # Each reply's row says where its channel connection came from (here: this machine).
    assert [c["channel_host"] for c in clients] == ["127.0.0.1"] * len(clients) != []


def test_allocator_reports_simulated_latency_and_trains_at_its_cuts(tmp_path,
                                                                    run):
    over = ["fleet.profiles=configs/profiles/mixed_fleet.yaml", "fleet.server=laptop-class-server",
            "fleet.devices=[raspberry-pi-4, jetson-orin-nano, laptop]",
            "strategy.options={steps: 5}"]
    writer, grid = run(tmp_path, "allocator", *over, clients=3)
    row = writer.rows[-1]
    check_bytes(row)
    assert row["sim_round_s"] > 0 and row["sim_uniform_round_s"] >= row["sim_round_s"] - 1e-9
    assert row["sim_gain"] == pytest.approx(1 - row["sim_round_s"] / row["sim_uniform_round_s"])
    # Clients trained at the cuts the allocation chose (partition i <-> node 1000 + i).
    chosen = {int(k.split("-")[1]): c for k, c in row["sim_cuts"].items()}
    assert {n - 1000: p["cut"] for n, p in plans(grid).items()} == chosen


def test_resume_continues_local_loss_and_sflv2_exactly(tmp_path, run):
    """Aux heads (strategy extras) and the shared optimizer survive a checkpoint."""
    for name, over in (("local-loss", ["strategy.options={cuts: [1, 2]}"]), ("sflv2", [])):
        full = run(tmp_path, name, *over, rounds=2, run_name=f"{name}-full")[0].rows
        run(tmp_path, name, *over, rounds=1, run_name=f"{name}-cut")
        resumed = run(tmp_path, name, *over, "run.resume=true", rounds=2,
                      run_name=f"{name}-cut")[0].rows
        assert [r["round"] for r in resumed] == [1, 2]
        for key in ("loss", "accuracy", "bytes_up", "bytes_down", "train_loss"):
            assert resumed[1][key] == pytest.approx(full[1][key], abs=1e-6), (name, key)


def test_u_shaped_run_sends_no_labels_to_the_server(tmp_path, run,
                                                    monkeypatch):
    """A whole u-shaped round: every frame the channel server receives is label-free."""
    from fedsplit.channel.server import SplitChannelServer

    seen: list[dict[str, bytes]] = []
    for method in ("_step", "_back", "_finish"):
        original = getattr(SplitChannelServer, method)

        def spy(self, request, peer="", _original=original):
            seen.append(wire.decode_frame(request)[1])
            return _original(self, request, peer)

        monkeypatch.setattr(SplitChannelServer, method, spy)
    writer, grid = run(tmp_path, "u-shaped")
    assert writer.rows[-1]["batches"] == 10 and len(seen) == 2 * 10 + 2  # STEP+BACK, FINISH
    assert all("labels" not in fields for fields in seen)


def test_split_inference_evaluation_sends_the_test_activations_through_codec_up(tmp_path,
                                                                                run):
    """``eval.through-codec``: identity reproduces the plain evaluation and counts the
    float32 frames; a 2-bit codec sends ~16x fewer bytes and its accuracy is its own."""
    exact, _ = run(tmp_path / "a", "sflv1", "eval.through-codec=true")
    row = exact.rows[-1]
    assert row["codec_accuracy"] == row["accuracy"] and row["codec_loss"] == row["loss"]
    # 200 test samples of (32, 4, 4) float32 cut features (digits CNN, cut 2), plus a small
    # header per batch (two batches of at most 128)
    assert 200 * 512 * 4 < row["eval_bytes_up"] < 200 * 512 * 4 + 2 * 32
    lossy, _ = run(tmp_path / "b", "sflv1", "eval.through-codec=true",
                   "codec.up=[{name: quantize, bits: 2, scale: per-channel}]")
    row2 = lossy.rows[-1]
    assert row2["eval_bytes_up"] < row["eval_bytes_up"] / 10
    assert row2["codec_loss"] != row2["loss"]
    plain, _ = run(tmp_path / "c", "sflv1")
    assert "codec_accuracy" not in plain.rows[-1]  # off by default
