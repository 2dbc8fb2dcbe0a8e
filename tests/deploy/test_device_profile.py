"""Device profile JSON: round trip, validation, helpers."""

from __future__ import annotations

import json

import pytest

from fedsplit.deploy.profile import DeviceProfile, ProfileError, load_profile, save_profile


def _profile() -> DeviceProfile:
    return DeviceProfile(name="pi5", seconds_per_batch={2: 0.03, 1: 0.02},
                         peak_memory_mb={1: 300.0, 2: 900.0}, memory_limit_mb=512.0,
                         uplink_mbps=10.0, downlink_mbps=None,
                         cut_bytes_per_batch={1: 131093, 2: 65557})


def test_round_trip_with_string_cut_keys(tmp_path):
    path = save_profile(_profile(), tmp_path / "p.json")
    raw = json.loads(path.read_text())
    assert raw["schema"] == 1 and list(raw["seconds_per_batch"]) == ["1", "2"]
    back = load_profile(path)
    assert back == _profile()
    assert back.cuts == [1, 2] and back.fits(1) and not back.fits(2) and not back.fits(3)


def test_unknown_keys_are_kept(tmp_path):
    data = {**_profile().to_json(), "gpu": "orin"}
    back = DeviceProfile.from_json(data)
    assert back.extra == {"gpu": "orin"} and back.to_json()["gpu"] == "orin"


@pytest.mark.parametrize("change, match", [
    ({"schema": 2}, "schema version 2"),
    ({"peak_memory_mb": {"1": 1.0}}, "same cuts"),
    ({"seconds_per_batch": {"one": 1.0}}, "integer cuts"),
    ({"seconds_per_batch": [1.0]}, "must map"),
])
def test_bad_profiles(change, match):
    with pytest.raises(ProfileError, match=match):
        DeviceProfile.from_json({**_profile().to_json(), **change})


def test_missing_keys_and_files(tmp_path):
    data = _profile().to_json()
    del data["memory_limit_mb"]
    with pytest.raises(ProfileError, match="memory_limit_mb"):
        DeviceProfile.from_json(data)
    with pytest.raises(ProfileError, match="benchmark-device"):
        load_profile(tmp_path / "none.json")
