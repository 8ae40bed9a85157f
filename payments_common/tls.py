"""Optional TLS and mutual TLS for gRPC servers and clients, configured by file paths (see settings.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsSettings:
    """Paths of PEM files. With no certificate the server speaks plaintext (inside a mesh or for tests).

    `client_ca_file` turns on mutual TLS: clients must present a certificate signed by it.
    """

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    @property
    def mode(self) -> str:
        """ "off", "on" or "mutual", for the start-up log line."""
        return "mutual" if self.client_ca_file else "on" if self.enabled else "off"

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for `add_secure_port`, or None for plaintext."""
        if not self.enabled:
            return None
        key, cert = Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes()
        if self.client_ca_file:
            return grpc.ssl_server_credentials(
                [(key, cert)],
                root_certificates=Path(self.client_ca_file).read_bytes(),
                require_client_auth=True,
            )
        return grpc.ssl_server_credentials([(key, cert)])


def channel_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Client credentials that trust `ca_file`, presenting a client certificate for mutual TLS when given."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
