"""Pure parts of upstream.py: endpoint parsing and the auto-sync endpoint rule."""

from __future__ import annotations

import pytest

from etcdproxy.upstream import host_port, member_endpoints, target


@pytest.mark.parametrize(
    ("endpoint", "expected_host_port", "expected_target"),
    [
        ("10.0.0.1:2379", "10.0.0.1:2379", "10.0.0.1:2379"),
        ("http://10.0.0.1:2379", "10.0.0.1:2379", "10.0.0.1:2379"),
        ("https://etcd-0.example:2379/", "etcd-0.example:2379", "etcd-0.example:2379"),
        ("http://[::1]:2379", "[::1]:2379", "[::1]:2379"),
        ("unix:///run/etcd.sock", "/run/etcd.sock", "unix:/run/etcd.sock"),
        ("unixs:///run/etcd.sock", "/run/etcd.sock", "unix:/run/etcd.sock"),
    ],
)
def test_endpoint_forms(endpoint: str, expected_host_port: str, expected_target: str) -> None:
    assert host_port(endpoint) == expected_host_port
    assert target(endpoint) == expected_target


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([], []),
        ([("m0", False, ["http://a:2379"])], ["http://a:2379"]),
        # clientv3's rule: unnamed (not yet started) members and learners are skipped
        ([("", False, ["http://new:2379"]), ("m1", True, ["http://learner:2379"])], []),
        (
            [("m0", False, ["http://a:2379", "http://a2:2379"]), ("m1", False, ["http://b:2379", "http://a:2379"])],
            ["http://a:2379", "http://a2:2379", "http://b:2379"],
        ),
    ],
)
def test_member_endpoints(members: list[tuple[str, bool, list[str]]], expected: list[str]) -> None:
    assert member_endpoints(members) == expected
