"""Mutual TLS tells a service that a client's certificate was signed by its CA, not which client
it is: with one CA for every service, the extractor's certificate (the service that parses
untrusted images) could create and delete datasets at the index. `--tls-client-names` names the
clients a service takes calls from (a certificate's common name or DNS names); the others are
refused, PERMISSION_DENIED `CLIENT_NOT_ALLOWED`. Health and reflection stay open to every
certificate the CA signed: a probe presents the service's own certificate."""

import dataclasses

import grpc

from convsearch.config import option
from convsearch.errors import PermissionDenied, shown
from convsearch.grpc_errors import abort
from convsearch.observability import behavior_of, with_behavior

OPEN_PREFIX = "/grpc."  # grpc.health.v1 and grpc.reflection


@dataclasses.dataclass(frozen=True)
class ClientNamesOption:
    """The option of a service that takes calls from named clients (its configuration inherits it)."""

    tls_client_names: str = option("", "with tls_client_ca: comma-separated names of the clients that may call, "
                                       "matched against a client certificate's common name and DNS names "
                                       "(health and reflection stay open to every certificate the CA signed); "
                                       "empty: every certificate the CA signed")

    def check_client_names(self) -> None:
        """Raises ValueError when names are given without mutual TLS."""
        if names(self.tls_client_names) and not getattr(self, "tls_client_ca", ""):
            raise ValueError("tls_client_names needs tls_client_ca (mutual TLS): without client certificates "
                             "there is no name to check")


def names(value: str) -> frozenset[str]:
    return frozenset(filter(None, (part.strip() for part in value.split(","))))


def certificate_names(context) -> list[str]:
    """The common name and DNS names of the client's certificate, as gRPC read them."""
    found = context.auth_context()
    return [value.decode(errors="replace") for key in ("x509_common_name", "peer_dns") for value in found.get(key, ())]


class AllowedClients(grpc.ServerInterceptor):
    """Refuses the calls of clients whose certificate names none of `allowed` (see the module)."""

    def __init__(self, allowed: frozenset[str]):
        self.allowed = allowed

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIX):
            return handler
        behavior = behavior_of(handler)

        def checked(request, context):
            presented = certificate_names(context)
            if not self.allowed.intersection(presented):
                abort(context, PermissionDenied(
                    f"this service takes calls only from the clients in its --tls-client-names "
                    f"({', '.join(sorted(self.allowed))}); this client's certificate names "
                    f"{shown(', '.join(presented) or 'nothing')}: call with one of those certificates, or add its "
                    "name there", reason="CLIENT_NOT_ALLOWED", metadata={"client": ", ".join(presented)}))
            return behavior(request, context)

        return with_behavior(handler, checked)


def allowed_clients(value: str) -> list[grpc.ServerInterceptor]:
    """The interceptor for a `tls_client_names` value, or none when it names no client."""
    allowed = names(value)
    return [AllowedClients(allowed)] if allowed else []
