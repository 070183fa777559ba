"""The gateway: the client-facing API, stateless, orchestrating the extractor and the index."""
