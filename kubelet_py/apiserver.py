"""The kubelet's Kubernetes adapter: the only module of kubelet_py that imports `kubernetes`."""

from __future__ import annotations

from pathlib import Path

from kubernetes import client, config


def server_version(kubeconfig: Path) -> str:
    """The API server's version, asked with the kubelet's own credentials."""
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    try:
        return str(client.VersionApi(api).get_code(_request_timeout=10).git_version)
    finally:
        api.close()
