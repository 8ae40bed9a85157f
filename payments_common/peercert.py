"""The identity of a client certificate that mutual TLS has verified: its URI SAN (SPIFFE ID), else its CN."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

# The gRPC auth-context property that holds the verified peer certificate.
PEM_PROPERTY = "x509_pem_cert"


@functools.lru_cache(maxsize=256)
def subject_of(pem: bytes) -> str | None:
    """The identity a certificate names: its first spiffe:// URI SAN, else its first URI SAN, else its CN."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    try:
        uris = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    spiffe = [uri for uri in uris if uri.startswith("spiffe://")]
    if spiffe or uris:
        return (spiffe or uris)[0]
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names and isinstance(names[0].value, str) and names[0].value:
        return names[0].value
    return None


def peer_subject(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The identity of the call's client certificate, or None when the client presented none."""
    pems = auth_context.get(PEM_PROPERTY)
    if not pems:
        return None
    return subject_of(bytes(pems[0]))
