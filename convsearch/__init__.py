"""ConvNet Search: semantic image search with pretrained convolutional networks.

This package is shared by every service and client: generated gRPC code (under
`convsearch.<service>.v1`, made by `scripts/gen_protos.py`), configuration, errors, logging,
server wiring and wire conversions. It never imports torch.
"""

__version__ = "0.1.0"
