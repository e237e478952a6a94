"""Control-plane settings for the end-to-end tests that start a control plane themselves."""

from hpk.controlplane import ControlPlaneSettings

# Generous: the test machine has two cores and may be building something else.
TEST_PLANE_SETTINGS = ControlPlaneSettings(
    dns_bind_address="127.0.0.1",
    etcd_ready_timeout_s=90.0,
    apiserver_ready_timeout_s=150.0,
    controller_manager_ready_timeout_s=120.0,
    coredns_ready_timeout_s=90.0,
)
