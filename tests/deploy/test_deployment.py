"""A real deployment on loopback: SuperLink (TLS + SuperNode auth), SuperNodes, one run.

Real processes (flower-superlink, flower-supernode, the ServerApp and ClientApps Flower
starts), each in its own session, with FLWR_HOME and everything else in a temporary
folder and free ports. One module-scoped federation serves all tests; its finalizer
stops everything even when a test fails, and the last test checks that nothing of it
is left running.
"""

from __future__ import annotations

import copy
import ssl
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
import torch

from fedsplit.channel import ChannelError, SplitChannelClient, SplitChannelServer
from fedsplit.config import ChannelConfig, ModelConfig, TrainConfig
from fedsplit.deploy import procs
from fedsplit.deploy.federation import RunResult
from fedsplit.models import build_model
from fedsplit.server.app import channel_credentials
from fedsplit.server.trainer import ServerTrainer
from fedsplit.tasks import ClassificationObjective
from fedsplit.split import split_model

pytestmark = [pytest.mark.slow, pytest.mark.ci]

APP = Path(__file__).resolve().parents[2]  # the Flower App: the repository root
NODES = ["node0", "node1"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, make_federation):
    with make_federation(tmp_path_factory.mktemp("deployment"), NODES,
                         extra_keys=["rogue"]) as fed:
        yield fed


def _probe(address: str, root_cert: bytes | None, token: str) -> grpc.StatusCode | None:
    """Send one split-channel step with ``token``; return the refusal code."""
    hidden = torch.zeros(4, 32, 4, 4)  # (B, C, H, W): cnn-digits cut-2 activations
    try:
        with SplitChannelClient(address, token, 0, root_certificates=root_cert,
                                timeout=5.0) as client:
            client.step(hidden, {}, torch.zeros(4, dtype=torch.int64))
    except ChannelError as exc:
        return exc.code
    return None


def test_superlink_serves_only_tls_with_the_deployment_ca(federation):
    dep = federation.dep
    url = f"127.0.0.1:{dep.port}"
    ca = ssl.create_default_context(cafile=str(dep.certs.ca_cert))
    assert httpx.get(f"https://{url}/", verify=ca, timeout=10).status_code < 500
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{url}/", timeout=10)  # the system's CAs do not know ours
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{url}/", timeout=10)  # no plaintext on the TLS port


def test_unregistered_supernode_is_refused(federation):
    dep = federation.dep
    rogue = dep.start_supernode("rogue", {"partition-id": 0, "num-partitions": 2},
                                max_wait_time=60)
    assert rogue.popen is not None
    code = rogue.popen.wait(timeout=90)
    log = Path(rogue.log).read_text(errors="replace")
    assert code == 1, log[-2000:]  # flwr_exit: status 1, Flower's own code in the log
    assert "Exit Code: 305" in log  # SUPERNODE_CONNECTION_ERROR
    assert "Failed to activate SuperNode" in log
    registered = {dep.nodes[n]["node_id"] for n in NODES}
    assert set(dep.node_status()) == registered  # the rogue never got a node id


def test_one_round_end_to_end_with_forged_token_refused(federation):
    dep = federation.dep
    result: dict[str, RunResult | BaseException] = {}

    def run() -> None:
        try:
            result["run"] = dep.run(APP, {"train.rounds": 1}, run_name="e2e", timeout=600)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            result["run"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    # While the run is live, its split channel (TLS, fixed port) refuses a forged token
    # and a client that does not speak TLS.
    address = f"127.0.0.1:{dep.channel_port}"
    ca = dep.certs.ca_cert.read_bytes()
    forged = plaintext = None
    while thread.is_alive() and forged is None:
        code = _probe(address, ca, "forged-" + "x" * 32)
        if code == grpc.StatusCode.UNAVAILABLE:  # not listening yet
            time.sleep(0.3)
            continue
        forged = code
        plaintext = _probe(address, None, "forged")
    thread.join()
    res = result["run"]
    if isinstance(res, BaseException):
        raise res
    print(f"\ndeployed round: accuracy {res.accuracy:.4f}, {res.seconds:.1f}s, "
          f"Flower traffic {res.flwr_traffic_bytes} bytes")
    assert res.ok, Path(res.log).read_text()[-3000:]
    assert forged == grpc.StatusCode.UNAUTHENTICATED
    assert plaintext == grpc.StatusCode.UNAVAILABLE  # no TLS handshake, no channel
    [row] = res.rows
    assert row["round"] == 1 and row["clients"] == 2 and row["failures"] == 0
    assert res.accuracy is not None and res.accuracy > 0.2  # chance is 0.1
    # The forged request changed nothing: the server trained exactly on the devices'
    # examples, and its byte count equals what the two real clients counted.
    assert row["examples"] == federation.examples
    assert row["cut_bytes_up"] == row["client_cut_bytes_up"] > 0
    assert row["cut_bytes_down"] == row["client_cut_bytes_down"] > 0
    assert (res.run_dir / "config.yaml").is_file()


def test_expired_and_forged_tokens_change_nothing(federation):
    """The channel with the deployment's certificates: a token of an earlier round, one
    past its deadline and a forged one are refused, and leave the server untouched."""
    certs = federation.dep.certs
    torch.manual_seed(0)
    split = split_model(build_model(ModelConfig(name="cnn-digits", num_labels=10)), 2)
    trainer = ServerTrainer(split.server, TrainConfig(), ClassificationObjective(10))
    cfg = SimpleNamespace(**{**vars(ChannelConfig()), "port": 0})
    creds = channel_credentials(SimpleNamespace(tls_cert=str(certs.server_cert),
                                                tls_key=str(certs.server_key)))
    ca = certs.ca_cert.read_bytes()
    batch = torch.rand(8, 1, 8, 8)
    labels = torch.randint(0, 10, (8,))
    with SplitChannelServer(trainer, cfg, credentials=creds) as server:
        trainer.begin_round(1)
        old = server.open_round(1, ["c0"], timeout=60)["c0"]
        server.close_round()
        trainer.end_round()
        trainer.begin_round(2)
        short = server.open_round(2, ["c0"], timeout=0.2)["c0"]
        time.sleep(0.4)  # past this round's deadline
        before = copy.deepcopy(split.server.state_dict())
        for token in (old.token, short.token, "forged-" + "y" * 32):
            hidden = split.client({"x": batch, "labels": labels}).hidden
            with SplitChannelClient(server.address, token, 0, root_certificates=ca) as c:
                with pytest.raises(ChannelError) as err:
                    c.step(hidden, {}, labels)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert server.rejected == 3
        traffic = server.close_round()
        assert traffic["c0"].steps == 0 and traffic["c0"].bytes_up == 0
        after = split.server.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        # A fresh round's token still works, from step 0: nothing advanced.
        trainer.begin_round(3)
        fresh = server.open_round(3, ["c0"], timeout=60)["c0"]
        hidden = split.client({"x": batch, "labels": labels}).hidden
        with SplitChannelClient(server.address, fresh.token, fresh.seed,
                                root_certificates=ca) as c:
            reply = c.step(hidden, {}, labels)
        assert reply.grad.shape == hidden.shape


def test_stop_leaves_nothing_running(federation):
    dep = federation.dep
    started = [int(p["pid"]) for p in dep.processes.values()]
    assert started and procs.marked_pids(dep.marker)
    dep.stop(grace=15)
    assert procs.marked_pids(dep.marker) == []
    assert not any(procs.alive(pid) for pid in started)
