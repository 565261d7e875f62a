"""Client identity for rate limiting: the peer address, or the address a
trusted proxy reports in x-forwarded-for."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from tokenflow_grpc.settings import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_address(peer: str) -> Address | None:
    """Parse a gRPC peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5"); None for other kinds."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]")
        host = host.split("%", 1)[0]
    else:
        return None
    try:
        return _unmapped(ipaddress.ip_address(host))
    except ValueError:
        return None


def _unmapped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address.version == network.version and address in network for network in trusted)


def client_identity(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """Return the identity to rate limit for a call.

    forwarded_for contains the x-forwarded-for metadata values in order. The
    header is read only when the peer is a trusted proxy, and then from the
    right: each trusted hop is skipped and the first untrusted address is the
    client. A malformed entry stops the walk at the last good address, so a
    client cannot pick an identity by sending garbage.
    """
    address = peer_address(peer)
    if address is None:
        return peer or "unknown"
    if not _is_trusted(address, trusted):
        return str(address)

    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    client = address
    for hop in reversed(hops):
        try:
            hop_address = _unmapped(ipaddress.ip_address(hop))
        except ValueError:
            break
        client = hop_address
        if not _is_trusted(hop_address, trusted):
            break
    return str(client)
